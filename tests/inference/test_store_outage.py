"""The inference service tells the model store being down from the store being up with its
hub sources failing: different status, different message; it retries only the first."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from inference_service.config import InferenceConfig
from inference_service.metrics import InferenceMetrics
from inference_service.model_source import StoreModelSource
from tests.hubserver import HubServer, refused_endpoint
from tests.netfaults import DroppingPort
from tests.support import (
    DATA_DIR,
    InferenceHandle,
    InferenceProcess,
    StoreHandle,
    StoreProcess,
    free_port,
    get_model,
    transcribe,
    wait_for,
)
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve_common.errors import NotFound, Unavailable

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
INFERENCE = "voxserve.inference.v1.Inference"


def test_a_store_that_cannot_be_reached_is_unavailable_after_retries(tmp_path: Path) -> None:
    source = StoreModelSource(InferenceConfig(model_store=f"127.0.0.1:{free_port()}", cache_dir=tmp_path))
    try:
        with pytest.raises(Unavailable, match="model store unreachable while looking up test-tiny"):
            source.describe("test-tiny")
    finally:
        source.close()


def test_a_store_whose_sources_fail_is_failed_precondition_not_unavailable(
    start_store: Callable[..., StoreHandle], start_inference: Callable[..., InferenceHandle]
) -> None:
    store = start_store(hub_endpoints=(refused_endpoint(),), download_retries=1)
    inference = start_inference(store=store, default_model="test-tiny")
    with pytest.raises(grpc.RpcError) as caught:
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=120))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    assert "the model store could not download while pulling test-tiny" in details
    assert "every hub source failed" in details and "unreachable" not in details


def sample(metrics: InferenceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_an_unreachable_store_counts_as_store_unreachable_and_clears_the_reachable_gauge(
    tmp_path: Path, start_store: Callable[..., StoreHandle]
) -> None:
    metrics = InferenceMetrics()
    assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 0
    assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 0
    assert sample(metrics, "voxserve_store_reachable") == 0  # no contact yet
    port = free_port()
    source = StoreModelSource(InferenceConfig(model_store=f"127.0.0.1:{port}", cache_dir=tmp_path), metrics=metrics)
    try:
        with pytest.raises(Unavailable):
            source.describe("test-tiny")
        assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 1
        assert sample(metrics, "voxserve_store_reachable") == 0

        start_store(port=port)  # the store comes up on that address: the next call reaches it
        assert source.describe("test-tiny").model_id == "test-tiny"
        assert sample(metrics, "voxserve_store_reachable") == 1
        with pytest.raises(NotFound):  # an answer, even an error, is contact
            source.describe("no-such-model")
        assert sample(metrics, "voxserve_store_reachable") == 1
        assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 1
        assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 0
    finally:
        source.close()


def test_failing_sources_count_as_sources_failed_with_the_store_reachable(
    start_store: Callable[..., StoreHandle], start_inference: Callable[..., InferenceHandle]
) -> None:
    store = start_store(hub_endpoints=(refused_endpoint(),), download_retries=1)
    inference = start_inference(store=store, default_model="test-tiny")
    metrics: InferenceMetrics = inference.app.metrics
    assert sample(metrics, "voxserve_store_reachable") == 1  # the start-up check reached it
    with pytest.raises(grpc.RpcError):
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=120))
    assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 1
    assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 0
    assert sample(metrics, "voxserve_store_reachable") == 1


# As long as the outage issue 17 saw: by then gRPC's default reconnect backoff had grown to
# 16-27 s between attempts, and every call until the next attempt failed.
OUTAGE_SECONDS = 30.0


def test_the_first_transcribe_after_the_store_is_back_succeeds(tmp_path: Path, hub: HubServer) -> None:
    """A real store process stopped for a while, then started again on the same port: once it is
    SERVING with the model READY, the inference service's next request reaches it.

    While it is down the port drops every connection, so the test sees the inference service's
    reconnect attempts, and the store comes back just after one: the next one is a whole
    backoff away (with gRPC's defaults, 21 s or more after 30 s of outage; bounded, ~1 s)."""
    port = free_port()
    data_dir = tmp_path / "store"
    embedded = {"VOXSERVE_IMPORT_EMBEDDED": "true"}
    store = StoreProcess(tmp_path, data_dir, hub, env=embedded, port=port)
    inference = InferenceProcess(tmp_path, f"127.0.0.1:{port}")
    try:
        store.wait_serving(timeout=60)
        ready = lambda: get_model(store, "whisper-tiny.en").state == store_pb.READY  # noqa: E731
        wait_for(ready, timeout=120, interval=0.2, message="the embedded model READY in the store")
        inference.wait_status(health_pb2.HealthCheckResponse.SERVING, INFERENCE, timeout=120)

        store.process.terminate()  # a graceful stop: the store's channel goes away
        store.process.wait(60)
        store.close()
        down = DroppingPort(port)
        try:
            outage_began = time.monotonic()
            with pytest.raises(grpc.RpcError) as failed:
                transcribe(inference, SHORT, timeout=120)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "model store unreachable" in (failed.value.details() or "")
            wait_for(
                lambda: any(at > outage_began + OUTAGE_SECONDS for at in down.attempts),
                timeout=OUTAGE_SECONDS + 120,
                interval=0.05,
                message="a reconnect attempt after the outage",
            )
        finally:
            down.close()

        store = StoreProcess(tmp_path, data_dir, hub, env=embedded, port=port, name="store-again")
        store.wait_serving(timeout=60)
        wait_for(ready, timeout=120, interval=0.2, message="the model READY in the restarted store")
        events = transcribe(inference, SHORT, timeout=180)
        assert events[-1].WhichOneof("event") == "completed"
        assert "report" in " ".join(e.segment.text for e in events if e.WhichOneof("event") == "segment")
    finally:
        inference.close()
        store.close()
