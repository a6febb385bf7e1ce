"""One download at a time, FIFO queue, joining, cancel, delete while busy, disk check."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from model_service.catalog import CatalogEntry
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreHandle,
    make_catalog,
    partial_size,
    start_pull,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def state_of(handle: StoreHandle, model_id: str) -> int:
    return handle.stub.GetModel(pb.GetModelRequest(model_id=model_id)).state


def test_concurrent_pulls_join_one_download(store: StoreHandle, hub) -> None:
    hub.throttle(40 << 20, path="model.bin")
    pulls = [start_pull(store, "test-tiny") for _ in range(4)]
    for thread, _ in pulls:
        thread.join(120)
    for _, result in pulls:
        assert "error" not in result, result.get("error")
        assert result["events"][-1].state == pb.READY
    size = (TINY_EN_DIR / "model.bin").stat().st_size
    assert hub.bytes_served(TINY_REPO, "model.bin") == size
    started = store.store.metrics.downloads_started.labels("test-tiny", hub.endpoint)._value.get()
    assert started == 1


def test_queue_is_fifo_with_visible_positions(start_store, hub) -> None:
    catalog = make_catalog()
    catalog["test-text-2"] = CatalogEntry("test-text-2", "whisper", TEXT_REPO, "main", (), ("config.json",))
    catalog["test-text-3"] = CatalogEntry("test-text-3", "whisper", TEXT_REPO, "main", (), ("config.json",))
    handle = start_store(catalog=catalog)
    hub.throttle(15 << 20, path="model.bin")
    first = start_pull(handle, "test-tiny")
    wait_for(lambda: state_of(handle, "test-tiny") == pb.DOWNLOADING, message="first download running")
    second = start_pull(handle, "test-text-2")
    wait_for(lambda: state_of(handle, "test-text-2") == pb.WAITING)
    third = start_pull(handle, "test-text-3")
    wait_for(lambda: state_of(handle, "test-text-3") == pb.WAITING)
    positions = {m.model_id: m.queue_position for m in handle.stub.ListModels(pb.ListModelsRequest()).models}
    assert positions["test-text-2"] == 1 and positions["test-text-3"] == 2
    assert state_of(handle, "test-tiny") == pb.DOWNLOADING  # never two at once
    hub.throttle(None)
    for thread, _ in (first, second, third):
        thread.join(120)
    ready_order = [
        e.model_id for e in handle.store.bus.history() if e.type.value == "STATE_CHANGED" and e.state.value == "READY"
    ]
    assert ready_order == ["test-tiny", "test-text-2", "test-text-3"]
    waiting_events = [e for e in second[1]["events"] if e.state == pb.WAITING]
    assert waiting_events and waiting_events[0].queue_position == 1
    # The third moved up when the first finished.
    assert any(e.state == pb.WAITING and e.queue_position == 1 for e in third[1]["events"])


def test_cancel_running_download_removes_partial_files(store: StoreHandle, hub) -> None:
    hub.throttle(4 << 20, path="model.bin")
    thread, result = start_pull(store, "test-tiny")
    partial_dir = store.store.registry.partial_dir / "test-tiny"
    # model.bin is the throttled file, so its .part stays in place until the cancel (a
    # small file's .part can be moved into models/ between listing and stat).
    wait_for(lambda: partial_size(store.store.data_dir, "test-tiny", "model.bin") > 0)
    model = store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-tiny"))
    thread.join(30)
    assert not thread.is_alive()
    assert result["error"].code() == grpc.StatusCode.CANCELLED
    assert model.state in (pb.NOT_DOWNLOADED, pb.INCOMPLETE)
    assert not partial_dir.exists()
    assert not (store.store.model_dir("test-tiny") / "model.bin").exists()


def test_cancel_waiting_download(store: StoreHandle, hub) -> None:
    hub.throttle(4 << 20, path="model.bin")
    first = start_pull(store, "test-tiny")
    wait_for(lambda: state_of(store, "test-tiny") == pb.DOWNLOADING)
    second = start_pull(store, "test-text")
    wait_for(lambda: state_of(store, "test-text") == pb.WAITING)
    model = store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-text"))
    assert model.state == pb.NOT_DOWNLOADED
    second[0].join(10)
    assert second[1]["error"].code() == grpc.StatusCode.CANCELLED
    store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-tiny"))
    first[0].join(30)
    assert hub.bytes_served(TEXT_REPO) == 0


def test_cancel_with_nothing_running_is_failed_precondition(store: StoreHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-text"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_delete_refused_while_downloading_then_allowed(store: StoreHandle, hub) -> None:
    hub.throttle(8 << 20, path="model.bin")
    thread, _ = start_pull(store, "test-tiny")
    wait_for(lambda: state_of(store, "test-tiny") == pb.DOWNLOADING)
    with pytest.raises(grpc.RpcError) as info:
        store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cancel" in info.value.details().lower()
    hub.throttle(None)
    thread.join(60)
    assert state_of(store, "test-tiny") == pb.READY
    model = store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny"))
    assert model.state == pb.NOT_DOWNLOADED
    assert not store.store.model_dir("test-tiny").exists()


def test_not_enough_disk_is_failed_precondition_with_numbers(start_store, hub) -> None:
    handle = start_store(disk_reserve_bytes=1 << 62)
    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.PullModel(pb.PullModelRequest(model_id="test-tiny"), timeout=60))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details()
    size = sum(p.stat().st_size for p in Path(TINY_EN_DIR).iterdir() if p.name != "__init__.py")
    assert "not enough disk space" in details and str(size) in details and "available" in details
    assert hub.bytes_served(TINY_REPO) == 0


def test_cancel_is_prompt_on_a_slow_source(store: StoreHandle, hub) -> None:
    """On a slow source CancelDownload returns with the cancel already done (the fetcher
    checks for cancellation on every network read, not per megabyte)."""
    hub.throttle(32 << 10, path="model.bin")
    thread, result = start_pull(store, "test-tiny")
    partial_dir = store.store.registry.partial_dir / "test-tiny"
    # model.bin is the throttled file, so its .part stays in place until the cancel (a
    # small file's .part can be moved into models/ between listing and stat).
    wait_for(lambda: partial_size(store.store.data_dir, "test-tiny", "model.bin") > 0)
    model = store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-tiny"))
    assert model.state in (pb.NOT_DOWNLOADED, pb.INCOMPLETE)
    thread.join(30)
    assert result["error"].code() == grpc.StatusCode.CANCELLED
    assert not partial_dir.exists()


def test_delete_right_after_the_pull_ends_is_not_refused(store: StoreHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull's stream ends when its job finishes; the job leaves the queue moments later. A
    client that deletes the model as soon as its pull returned must not be told the model still
    downloads (seen in CI on a loaded machine). The job's finish is slowed here to widen that window."""
    from model_service.store.download.queue import DownloadJob

    finish = DownloadJob.finish
    slowed = threading.Event()

    def slow_finish(job: DownloadJob, error: BaseException | None) -> None:
        finish(job, error)  # the pull's stream ends here
        if job.model_id == "test-text":
            slowed.set()
            time.sleep(1.0)  # ... and the job leaves the queue only after this

    monkeypatch.setattr(DownloadJob, "finish", slow_finish)
    events = list(store.stub.PullModel(pb.PullModelRequest(model_id="test-text"), timeout=60))
    assert events[-1].state == pb.READY
    model = store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-text"), timeout=30)
    assert slowed.is_set()
    assert model.state == pb.NOT_DOWNLOADED
