"""A store killed with SIGKILL mid-download resumes from its partial file after restart."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import grpc
import yaml

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreProcess,
    kill_mid_download,
    partial_size,
    pull,
    sha256,
    start_pull,
    text_repo_files,
    tiny_en_files,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def test_kill9_mid_download_resumes_with_range_after_restart(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    size = (TINY_EN_DIR / "model.bin").stat().st_size
    kill_mid_download(tmp_path, data_dir, hub, store_processes, min_bytes=20_000_000)
    kept = partial_size(data_dir, "test-tiny", "model.bin")
    assert kept > 20_000_000, "the partial file must survive SIGKILL"
    hub.reset_stats()

    second = StoreProcess(tmp_path, data_dir, hub, name="second")
    store_processes.append(second)
    second.wait_serving()
    events = pull(second, "test-tiny")
    assert events[-1].state == pb.READY

    served = hub.bytes_served(TINY_REPO, "model.bin")
    assert served < size - 15_000_000, f"resume re-fetched {served} of {size} bytes"
    # Not an exact match: the hub may still push a chunk into the killed client's socket
    # after reset_stats(). The Range header below pins where the new process resumed.
    assert served >= size - kept
    ranges = [r.headers.get("Range", "") for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]
    assert f"bytes={kept}-" in ranges, ranges
    model = second.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"))
    assert model.state == pb.READY
    on_disk = Path(model.local_path) / "model.bin"
    expected = sha256(TINY_EN_DIR / "model.bin")
    assert sha256(on_disk) == expected
    assert {f.path: f.sha256 for f in model.files}["model.bin"] == expected
    assert not (data_dir / "partial" / "test-tiny").exists()


# --------------------------------------------------------------------------- the kill sweep


def sweep_catalog(path: Path) -> Path:
    tiny = {"kind": "whisper", "repo_id": TINY_REPO, "allow_patterns": list(WHISPER_FILES),
            "required_files": list(WHISPER_REQUIRED)}  # fmt: skip
    text = {"kind": "whisper", "repo_id": TEXT_REPO, "required_files": ["config.json"]}
    path.write_text(yaml.safe_dump({"models": {"test-tiny": tiny, "test-text": text}}))
    return path


EXPECTED_SHA256 = {
    "test-tiny": {name: sha256(path) for name, path in tiny_en_files().items()},
    "test-text": {name: hashlib.sha256(data).hexdigest() for name, data in text_repo_files().items()},
}


def assert_ready_means_intact(process: StoreProcess) -> dict[str, int]:
    """No model is READY unless every file is on disk with the hub's sha256; returns states."""
    states = {}
    for model in process.stub.ListModels(pb.ListModelsRequest()).models:
        if model.model_id not in EXPECTED_SHA256:  # built-in catalog models: nothing on disk
            assert model.state == pb.NOT_DOWNLOADED, model.model_id
            continue
        states[model.model_id] = model.state
        if model.state != pb.READY:
            continue
        expected = EXPECTED_SHA256[model.model_id]
        assert {f.path for f in model.files} == set(expected), model.model_id
        for name, digest in expected.items():
            path = Path(model.local_path) / name
            assert path.is_file() and sha256(path) == digest, f"{model.model_id}/{name} READY but not intact"
    return states


def kill_on_event(process: StoreProcess, model_id: str, state: int) -> threading.Thread:
    """SIGKILL ``process`` as soon as a STATE_CHANGED event of ``model_id`` to ``state`` arrives."""

    def watch() -> None:
        request = pb.WatchModelsRequest(model_ids=[model_id], types=[pb.STATE_CHANGED])
        try:
            for event in process.stub.WatchModels(request, timeout=120):
                if event.state == state:
                    process.process.kill()
                    return
        except grpc.RpcError:
            return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_kill9_sweep_over_a_pull_never_leaves_a_ready_model_with_bad_files(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    """SIGKILL at many points of pulls (after N bytes of model.bin for several N, right
    after VERIFYING, at the READY commit, mid small file): after every restart no model
    is READY unless its files are intact, partial bytes are kept, the last pulls complete."""
    data_dir = tmp_path / "data"
    catalog = sweep_catalog(tmp_path / "sweep.yaml")
    stage = 0

    def restart() -> StoreProcess:
        nonlocal stage
        stage += 1
        process = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)], name=f"sweep-{stage}")
        store_processes.append(process)
        process.wait_serving()
        assert_ready_means_intact(process)
        return process

    def dead(process: StoreProcess) -> None:
        process.process.wait(60)
        process.channel.close()

    def delete_if_ready(process: StoreProcess, model_id: str) -> None:
        if process.stub.GetModel(pb.GetModelRequest(model_id=model_id)).state == pb.READY:
            process.stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id))

    hub.throttle(16 << 20, path="model.bin")
    kept = 0
    for kill_at in (2_000_000, 12_000_000, 25_000_000, 40_000_000, 55_000_000, 70_000_000):
        process = restart()
        assert partial_size(data_dir, "test-tiny", "model.bin") >= kept, "partial bytes lost across SIGKILL"
        start_pull(process, "test-tiny")
        wait_for(lambda n=kill_at: partial_size(data_dir, "test-tiny", "model.bin") > n, timeout=60)
        process.kill()
        kept = partial_size(data_dir, "test-tiny", "model.bin")
    hub.throttle(None)

    # Right after VERIFYING (model.bin moved in, the READY commit about to happen).
    process = restart()
    watcher = kill_on_event(process, "test-tiny", pb.VERIFYING)
    start_pull(process, "test-tiny")
    watcher.join(60)
    dead(process)

    for model_id, state in (("test-text", pb.VERIFYING), ("test-text", pb.READY), ("test-text", pb.DOWNLOADING)):
        process = restart()
        delete_if_ready(process, model_id)
        watcher = kill_on_event(process, model_id, state)
        start_pull(process, model_id)
        watcher.join(60)
        dead(process)

    # Mid-file of the 2 MiB weights.bin.
    hub.throttle(1 << 20, path="weights.bin")
    process = restart()
    delete_if_ready(process, "test-text")
    start_pull(process, "test-text")
    wait_for(lambda: partial_size(data_dir, "test-text", "weights.bin") > 300_000, timeout=60)
    process.kill()
    hub.throttle(None)

    final = restart()
    for model_id in ("test-tiny", "test-text"):
        assert pull(final, model_id)[-1].state == pb.READY
    states = assert_ready_means_intact(final)
    assert states == {"test-tiny": pb.READY, "test-text": pb.READY}
    assert not (data_dir / "partial" / "test-tiny").exists()
    assert not (data_dir / "partial" / "test-text").exists()
