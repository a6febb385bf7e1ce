"""Source choice per pull, named endpoints, ListSources, circuit breakers and their metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from model_service.config import ModelStoreConfig
from model_service.store.download.sources import (
    OFFICIAL_ENDPOINT,
    BreakerState,
    Source,
    SourceBreakers,
    default_sources,
)
from tests.hubserver import HubServer, refused_endpoint
from tests.support import TEXT_REPO, StoreHandle, get_model, pull, text_repo_files, wait_for
from voxserve.modelstore.v1 import modelstore_pb2 as pb

TEXT_BYTES = sum(len(v) for v in text_repo_files().values())


@pytest.fixture
def mirror() -> Iterator[HubServer]:
    server = HubServer()
    server.start()
    server.add_repo(TEXT_REPO, text_repo_files())
    yield server
    server.stop()


def sources(handle: StoreHandle) -> dict[str, pb.Source]:
    return {s.name: s for s in handle.stub.ListSources(pb.ListSourcesRequest()).sources}


def metric(handle: StoreHandle, name: str, **labels: str) -> float | None:
    return handle.store.metrics.registry.get_sample_value(name, labels)


def delete(handle: StoreHandle, model_id: str) -> None:
    handle.stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id))


def test_endpoint_names_default_and_explicit() -> None:
    assert default_sources(("mirror=http://m:1/", "https://huggingface.co"), None) == (
        Source("mirror", "http://m:1"),
        Source("official", OFFICIAL_ENDPOINT),
    )
    assert default_sources(("http://hf-mirror.example",), None) == (
        Source("hf-mirror.example", "http://hf-mirror.example"),
    )
    with pytest.raises(ValueError, match="named 'a'"):
        default_sources(("a=http://x", "a=http://y"), None)
    with pytest.raises(ValueError, match="http"):
        default_sources(("mirror=ftp://x",), None)
    ModelStoreConfig(hub_endpoints=("mirror=https://m", "https://huggingface.co")).validate()


def test_pull_with_a_source_tries_only_that_one(
    start_store: Callable[..., StoreHandle], hub: HubServer, mirror: HubServer
) -> None:
    handle = start_store(hub_endpoints=(f"mirror={mirror.endpoint}", f"official={hub.endpoint}"))
    events = list(handle.stub.PullModel(pb.PullModelRequest(model_id="test-text", source="official"), timeout=60))
    assert events[-1].state == pb.READY
    assert get_model(handle, "test-text").source == hub.endpoint
    assert mirror.requests == [] and hub.bytes_served(TEXT_REPO) == TEXT_BYTES

    delete(handle, "test-text")
    mirror.fail_with(503)  # the chosen source fails: no fallback to the other one
    hub.reset_stats()
    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.PullModel(pb.PullModelRequest(model_id="test-text", source=mirror.endpoint), timeout=60))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert hub.requests == []

    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.PullModel(pb.PullModelRequest(model_id="test-text", source="elsewhere"), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "elsewhere" in info.value.details()
    assert "mirror" in info.value.details() and "official" in info.value.details()


def test_list_sources_and_metrics_start_healthy_at_zero(
    start_store: Callable[..., StoreHandle], hub: HubServer, mirror: HubServer
) -> None:
    handle = start_store(hub_endpoints=(f"mirror={mirror.endpoint}", hub.endpoint))
    listed = handle.stub.ListSources(pb.ListSourcesRequest()).sources
    host = hub.endpoint.split("://", 1)[1]
    assert [(s.name, s.url) for s in listed] == [("mirror", mirror.endpoint), (host, hub.endpoint)]
    for source in listed:
        assert source.breaker_state == pb.CLOSED and source.consecutive_failures == 0
        assert not source.HasField("last_success_at") and not source.HasField("last_failure_at")
        assert metric(handle, "voxserve_source_up", source=source.name) == 1
        for reason in ("http_5xx", "connection", "timeout", "reset", "integrity"):
            assert metric(handle, "voxserve_source_failures_total", source=source.name, reason=reason) == 0
    pull(handle, "test-text")
    assert sources(handle)["mirror"].HasField("last_success_at")
    assert not sources(handle)[host].HasField("last_success_at")  # never needed


def test_breaker_opens_skips_then_half_open_probe_closes_it(
    start_store: Callable[..., StoreHandle], hub: HubServer, mirror: HubServer
) -> None:
    mirror.fail_with(503)
    handle = start_store(
        hub_endpoints=(f"mirror={mirror.endpoint}", f"official={hub.endpoint}"),
        breaker_failures=3,
        breaker_cooldown_seconds=1.0,
    )
    # 503 is transient: retried (download_retries = 3) with backoff, then the next source.
    assert pull(handle, "test-text")[-1].state == pb.READY
    assert get_model(handle, "test-text").source == hub.endpoint
    assert len(mirror.requests) == 3
    state = sources(handle)["mirror"]
    assert state.breaker_state == pb.OPEN and state.consecutive_failures == 3
    assert "HTTP 503" in state.last_failure_reason and state.HasField("last_failure_at")
    assert metric(handle, "voxserve_source_up", source="mirror") == 0
    assert metric(handle, "voxserve_source_failures_total", source="mirror", reason="http_5xx") == 3

    # While open the mirror costs nothing: not one request. (A cool-down that cannot end
    # during the test would be the other choice; this one is polled, never timed.)
    delete(handle, "test-text")
    mirror.reset_stats()
    still_open = sources(handle)["mirror"].retry_after_seconds > 0
    assert pull(handle, "test-text")[-1].state == pb.READY
    if still_open:
        assert mirror.requests == []

    wait_for(lambda: sources(handle)["mirror"].retry_after_seconds == 0, message="cool-down over")
    mirror.fail_with(None)
    delete(handle, "test-text")
    mirror.reset_stats()
    assert pull(handle, "test-text")[-1].state == pb.READY
    assert get_model(handle, "test-text").source == mirror.endpoint  # the probe succeeded
    state = sources(handle)["mirror"]
    assert state.breaker_state == pb.CLOSED and state.consecutive_failures == 0
    assert metric(handle, "voxserve_source_up", source="mirror") == 1


def test_refused_connection_is_not_retried_and_opens_after_n_pulls(
    start_store: Callable[..., StoreHandle], hub: HubServer
) -> None:
    dead = refused_endpoint()
    handle = start_store(
        hub_endpoints=(f"dead={dead}", hub.endpoint), breaker_failures=2, breaker_cooldown_seconds=3600
    )
    for expected in (1, 2):
        assert pull(handle, "test-text")[-1].state == pb.READY
        assert sources(handle)["dead"].consecutive_failures == expected
        delete(handle, "test-text")
    assert sources(handle)["dead"].breaker_state == pb.OPEN
    assert metric(handle, "voxserve_source_failures_total", source="dead", reason="connection") == 2
    assert pull(handle, "test-text")[-1].state == pb.READY
    assert sources(handle)["dead"].consecutive_failures == 2  # skipped: no new attempt


def test_breaker_state_machine_with_a_fake_clock() -> None:
    now = [0.0]
    source = Source("m", "http://m")
    breakers = SourceBreakers([source], threshold=2, cooldown=10, clock=lambda: now[0])
    assert breakers.allow(source.url) == ""
    breakers.failure(source.url, "timeout", "timed out")
    assert breakers.allow(source.url) == ""
    breakers.failure(source.url, "timeout", "timed out")
    assert "circuit open" in breakers.allow(source.url)
    now[0] = 10.0
    assert breakers.allow(source.url) == ""  # the half-open probe
    assert breakers.health()[0].state == BreakerState.HALF_OPEN
    assert "half-open" in breakers.allow(source.url)  # only one probe at a time
    breakers.failure(source.url, "timeout", "timed out")
    assert breakers.health()[0].state == BreakerState.OPEN
    now[0] = 25.0
    assert breakers.allow(source.url) == ""
    breakers.success(source.url)
    health = breakers.health()[0]
    assert health.state == BreakerState.CLOSED and health.consecutive_failures == 0
