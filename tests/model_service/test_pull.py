"""PullModel against the loopback hub: the real huggingface_hub client, real bytes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.hubserver import refused_endpoint
from tests.support import TEXT_REPO, TINY_EN_DIR, TINY_EN_FILES, TINY_REPO, StoreHandle, pull, sha256, text_repo_files
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def pull_error(handle: StoreHandle, model_id: str, timeout: float = 120) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        pull(handle, model_id, timeout=timeout)
    return info.value


def test_pull_downloads_real_tiny_en_and_verifies_it(store: StoreHandle, hub) -> None:
    events = pull(store, "test-tiny")
    assert events[-1].state == pb.READY
    states = [e.state for e in events if e.type == pb.STATE_CHANGED]
    assert pb.WAITING in states and pb.DOWNLOADING in states and pb.VERIFYING in states
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    progress = [e for e in events if e.type == pb.PROGRESS]
    assert progress and progress[-1].bytes_total == sum((TINY_EN_DIR / n).stat().st_size for n in TINY_EN_FILES)
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"))
    assert model.state == pb.READY
    assert model.source == hub.endpoint
    assert model.revision == hub.commit(TINY_REPO)
    assert {f.path for f in model.files} == set(TINY_EN_FILES)
    for file in model.files:
        local = Path(model.local_path) / file.path
        assert file.present and file.size == local.stat().st_size
        assert file.sha256 == sha256(local) == sha256(TINY_EN_DIR / file.path)
    assert {f.path for f in model.files if f.required} == {"config.json", "model.bin", "tokenizer.json"}


def test_pull_of_ready_model_returns_at_once_without_network(store: StoreHandle, hub) -> None:
    pull(store, "test-text")
    hub.reset_stats()
    events = pull(store, "test-text")
    assert len(events) == 1 and events[0].state == pb.READY
    assert hub.requests == []


def test_subdirectory_files_land_inside_the_model_dir(store: StoreHandle) -> None:
    pull(store, "test-text")
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    root = Path(model.local_path)
    for name, content in text_repo_files().items():
        assert (root / name).read_bytes() == content


def test_fallback_to_next_source_and_source_recorded(start_store, store_config, hub) -> None:
    broken = type(hub)()
    broken.start()
    broken.add_repo(TEXT_REPO, text_repo_files())
    broken.fail_with(503)
    try:
        handle = start_store(hub_endpoints=(refused_endpoint(), broken.endpoint, hub.endpoint))
        events = pull(handle, "test-text")
        assert events[-1].state == pb.READY
        model = handle.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
        assert model.source == hub.endpoint
        assert hub.bytes_served(TEXT_REPO) == sum(len(v) for v in text_repo_files().values())
    finally:
        broken.stop()


def test_all_sources_failing_lists_every_reason(start_store, hub) -> None:
    refused = refused_endpoint()
    hub.fail_with(502)
    handle = start_store(hub_endpoints=(refused, hub.endpoint))
    error = pull_error(handle, "test-text")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert refused in error.details() and "connection failed" in error.details()
    assert hub.endpoint in error.details() and "HTTP 502" in error.details()
    model = handle.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    assert model.state == pb.ERROR and "HTTP 502" in model.error_message


def test_timeout_source_falls_through(start_store, hub) -> None:
    slow = type(hub)()
    slow.start()
    slow.add_repo(TEXT_REPO, text_repo_files())
    slow.hang(10)
    try:
        handle = start_store(hub_endpoints=(slow.endpoint, hub.endpoint), hub_timeout_seconds=0.5)
        assert pull(handle, "test-text")[-1].state == pb.READY
        assert handle.stub.GetModel(pb.GetModelRequest(model_id="test-text")).source == hub.endpoint
    finally:
        slow.stop()


def test_unknown_repo_is_not_found(start_store, hub) -> None:
    from model_service.catalog import CatalogEntry

    handle = start_store(catalog={"ghost": CatalogEntry("ghost", "whisper", "test-org/does-not-exist")})
    error = pull_error(handle, "ghost")
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "repository not found" in error.details()


def test_sha256_mismatch_never_ready(store: StoreHandle, hub) -> None:
    original = text_repo_files()["weights.bin"]
    hub.corrupt_file(TEXT_REPO, "weights.bin", bytes(reversed(original)))
    error = pull_error(store, "test-text")
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "sha256 mismatch for weights.bin" in error.details()
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    assert model.state == pb.ERROR
    assert not (store.store.model_dir("test-text") / "weights.bin").exists()
    assert "voxserve_verification_failures_total" in _metrics_text(store)


def test_small_file_checked_by_git_oid(store: StoreHandle, hub) -> None:
    hub.corrupt_file(TEXT_REPO, "config.json", b'{"name": "TEXT"}\n')
    error = pull_error(store, "test-text")
    assert error.code() == grpc.StatusCode.DATA_LOSS
    assert "git blob sha1 mismatch for config.json" in error.details()


def test_dropped_connection_resumes_with_range(store: StoreHandle, hub) -> None:
    size = (TINY_EN_DIR / "model.bin").stat().st_size
    hub.drop_after(5 << 20, times=2, path="model.bin")
    assert pull(store, "test-tiny")[-1].state == pb.READY
    ranges = [r.headers.get("Range") for r in hub.requests if r.path.endswith("model.bin")]
    assert any(r and r.startswith("bytes=") for r in ranges), ranges
    served = hub.bytes_served(TINY_REPO, "model.bin")
    assert served < size + (1 << 20), f"re-fetched too much: {served} of {size}"


def _metrics_text(handle: StoreHandle) -> str:
    from prometheus_client import generate_latest

    return generate_latest(handle.store.metrics.registry).decode()


def assert_progress_never_goes_back(events: list[pb.ModelEvent]) -> None:
    counted = [e for e in events if e.type in (pb.PROGRESS, pb.STATE_CHANGED) and e.bytes_total]
    done = [e.bytes_done for e in counted]
    assert done == sorted(done), [(pb.ModelState.Name(e.state), e.bytes_done) for e in counted]
    files = [e.files_done for e in counted]
    assert files == sorted(files)


def test_progress_is_monotonic_and_verifying_and_ready_carry_the_totals(store: StoreHandle, hub) -> None:
    events = pull(store, "test-tiny")
    assert_progress_never_goes_back(events)
    verifying = [e for e in events if e.type == pb.STATE_CHANGED and e.state == pb.VERIFYING]
    ready = events[-1]
    assert verifying and ready.state == pb.READY
    for event in (*verifying, ready):
        assert event.bytes_done == event.bytes_total > 0
        assert event.files_done == event.files_total == len(TINY_EN_FILES)


def test_progress_of_a_resumed_pull_is_monotonic_too(store: StoreHandle, hub) -> None:
    hub.drop_after(8 << 20, times=1, path="model.bin")
    events = pull(store, "test-tiny")
    assert events[-1].state == pb.READY
    assert_progress_never_goes_back(events)
