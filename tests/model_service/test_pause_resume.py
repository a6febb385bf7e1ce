"""PauseDownload / ResumeDownload: PAUSED keeps its bytes, holds no queue slot, survives restarts."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from model_service.catalog import CatalogEntry
from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreHandle,
    get_model,
    make_catalog,
    partial_size,
    pull,
    sha256,
    start_pull,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb

MODEL_BIN = (TINY_EN_DIR / "model.bin").stat().st_size


def pause(handle: Any, model_id: str) -> pb.Model:
    return handle.stub.PauseDownload(pb.PauseDownloadRequest(model_id=model_id))


def resume(handle: Any, model_id: str) -> pb.Model:
    return handle.stub.ResumeDownload(pb.ResumeDownloadRequest(model_id=model_id))


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def model_bin_ranges(hub: HubServer) -> list[str]:
    return [r.headers.get("Range", "") for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]


def start_tiny_download(handle: StoreHandle, hub: HubServer, min_bytes: int = 2_000_000) -> tuple[Any, dict]:
    hub.throttle(8 << 20, path="model.bin")
    pulled = start_pull(handle, "test-tiny")
    wait_for(lambda: partial_size(handle.store.data_dir, "test-tiny", "model.bin") > min_bytes, timeout=60)
    return pulled


def test_pause_running_keeps_bytes_frees_the_slot_and_resume_continues_with_range(
    store: StoreHandle, hub: HubServer
) -> None:
    (thread, result) = start_tiny_download(store, hub)
    waiting = start_pull(store, "test-text")
    wait_for(lambda: get_model(store, "test-text").state == pb.WAITING)

    model = pause(store, "test-tiny")
    assert model.state == pb.PAUSED
    thread.join(30)
    assert not thread.is_alive()
    # The pull that followed it ends with a clear status instead of hanging.
    assert result["error"].code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "paused; ResumeDownload continues it" in result["error"].details()
    kept = partial_size(store.store.data_dir, "test-tiny", "model.bin")
    assert kept > 2_000_000
    assert (store.store.registry.partial_dir / "test-tiny" / "model.bin.part.json").is_file()
    assert get_model(store, "test-tiny").bytes_on_disk >= kept
    # A paused model holds no slot: the waiting pull runs.
    waiting[0].join(60)
    assert waiting[1]["events"][-1].state == pb.READY
    assert get_model(store, "test-tiny").state == pb.PAUSED

    hub.throttle(None)
    hub.reset_stats()
    assert resume(store, "test-tiny").state in (pb.WAITING, pb.DOWNLOADING, pb.VERIFYING, pb.READY)
    events = pull(store, "test-tiny")  # joins the resumed download
    assert events[-1].state == pb.READY
    assert f"bytes={kept}-" in model_bin_ranges(hub)
    assert hub.bytes_served(TINY_REPO, "model.bin") == MODEL_BIN - kept
    assert sha256(store.store.model_dir("test-tiny") / "model.bin") == sha256(TINY_EN_DIR / "model.bin")
    assert not (store.store.registry.partial_dir / "test-tiny").exists()


def test_pause_waiting_takes_it_out_of_the_queue_and_resume_requeues_at_the_end(
    start_store: Callable[..., StoreHandle], hub: HubServer
) -> None:
    catalog = make_catalog()
    catalog["test-text-2"] = CatalogEntry("test-text-2", "whisper", TEXT_REPO, "main", (), ("config.json",))
    handle = start_store(catalog=catalog)
    first = start_tiny_download(handle, hub, min_bytes=1)
    second = start_pull(handle, "test-text")
    third = start_pull(handle, "test-text-2")
    wait_for(lambda: get_model(handle, "test-text-2").queue_position == 2)

    model = pause(handle, "test-text")
    assert model.state == pb.PAUSED and model.queue_position == 0
    second[0].join(30)
    assert second[1]["error"].code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_for(lambda: get_model(handle, "test-text-2").queue_position == 1, message="the next moved up")
    assert handle.store.downloads.queue.waiting_ids() == ["test-text-2"]

    model = resume(handle, "test-text")
    assert model.state == pb.WAITING and model.queue_position == 2  # at the end
    hub.throttle(None)
    for thread, _ in (first, third):
        thread.join(60)
    wait_for(lambda: get_model(handle, "test-text").state == pb.READY, timeout=60)
    ready = [
        e.model_id for e in handle.store.bus.history() if e.type.value == "STATE_CHANGED" and e.state.value == "READY"
    ]
    assert ready == ["test-tiny", "test-text-2", "test-text"]
    assert hub.bytes_served(TEXT_REPO, "weights.bin") == 2 * len(bytes(range(256)) * 8192)


def test_bad_states_are_failed_precondition_naming_the_state(store: StoreHandle, hub: HubServer) -> None:
    error = rpc_error(lambda: pause(store, "test-text"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "NOT_DOWNLOADED" in error.details()
    error = rpc_error(lambda: resume(store, "test-text"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "NOT_DOWNLOADED" in error.details()
    pull(store, "test-text")
    error = rpc_error(lambda: resume(store, "test-text"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "READY" in error.details()

    start_tiny_download(store, hub, min_bytes=1)
    pause(store, "test-tiny")
    error = rpc_error(lambda: pause(store, "test-tiny"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "PAUSED" in error.details()
    error = rpc_error(lambda: store.stub.VerifyModel(pb.VerifyModelRequest(model_id="test-tiny")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "PAUSED" in error.details()
    error = rpc_error(lambda: pause(store, ""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = rpc_error(lambda: pause(store, "no-such-model"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_pull_of_a_paused_model_resumes_it(store: StoreHandle, hub: HubServer) -> None:
    start_tiny_download(store, hub)
    pause(store, "test-tiny")
    kept = partial_size(store.store.data_dir, "test-tiny", "model.bin")
    hub.throttle(None)
    hub.reset_stats()
    assert pull(store, "test-tiny")[-1].state == pb.READY
    assert model_bin_ranges(hub) == [f"bytes={kept}-"]


def test_paused_survives_a_restart_and_cancel_removes_its_partials(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    first = start_store()
    start_tiny_download(first, hub)
    pause(first, "test-tiny")
    kept = partial_size(first.store.data_dir, "test-tiny", "model.bin")
    first.stop()

    second = start_store(config=store_config)
    assert second.store.scan_done.is_set()  # the start-up scan has run
    model = get_model(second, "test-tiny")
    assert model.state == pb.PAUSED
    assert model.bytes_on_disk >= kept
    assert partial_size(store_config.data_dir, "test-tiny", "model.bin") == kept
    assert second.store.downloads.queue.waiting_ids() == []  # paused is not queued again

    model = second.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-tiny"))
    assert model.state in (pb.NOT_DOWNLOADED, pb.INCOMPLETE)
    assert not (store_config.data_dir / "partial" / "test-tiny").exists()


def test_import_of_a_paused_model_drops_its_pause_request_and_partials(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    store = start_store()
    start_tiny_download(store, hub)
    assert pause(store, "test-tiny").state == pb.PAUSED
    hub.throttle(None)
    queue_file = store.store.data_dir / "queue.json"
    wait_for(  # written by the queue's worker just after the job stopped
        lambda: [r["model_id"] for r in json.loads(queue_file.read_text())["paused"]] == ["test-tiny"],
        message="queue.json holds the pause request",
    )
    assert (store.store.registry.partial_dir / "test-tiny").is_dir()

    imported = store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(TINY_EN_DIR)))
    assert imported.state == pb.READY
    assert not (store.store.registry.partial_dir / "test-tiny").exists()
    assert json.loads(queue_file.read_text())["paused"] == []
    # READY, not PAUSED: Resume has nothing to continue, a pull answers at once.
    assert rpc_error(lambda: resume(store, "test-tiny")).code() == grpc.StatusCode.FAILED_PRECONDITION
    hub.reset_stats()
    assert [e.state for e in pull(store, "test-tiny")] == [pb.READY]
    assert model_bin_ranges(hub) == []

    # And after a restart nothing of the pause comes back.
    store.stop()
    again = start_store(store_config)
    assert get_model(again, "test-tiny").state == pb.READY
    assert json.loads(queue_file.read_text())["paused"] == []
    assert not (again.store.registry.partial_dir / "test-tiny").exists()
