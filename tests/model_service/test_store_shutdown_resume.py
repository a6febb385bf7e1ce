"""A graceful stop (SIGTERM) keeps partial files and the queue; the next start resumes it."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import yaml

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED
from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreHandle,
    StoreProcess,
    get_model,
    partial_size,
    pull,
    sha256,
    start_pull,
    text_repo_files,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb

MODEL_BIN = (TINY_EN_DIR / "model.bin").stat().st_size
CHUNK = 1 << 20  # download_chunk_bytes default


def three_model_catalog(path: Path) -> Path:
    tiny = {"kind": "whisper", "repo_id": TINY_REPO, "allow_patterns": list(WHISPER_FILES),
            "required_files": list(WHISPER_REQUIRED)}  # fmt: skip
    text = {"kind": "whisper", "repo_id": TEXT_REPO, "required_files": ["config.json"]}
    path.write_text(yaml.safe_dump({"models": {"test-tiny": tiny, "test-text": text, "test-text-2": text}}))
    return path


def logged(process: StoreProcess, message: str) -> list[str]:
    """model_id of every JSON log line of ``process`` with this message, in order."""
    ids = []
    for line in process.stderr().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == message:
            ids.append(record.get("model_id"))
    return ids


def test_sigterm_mid_pull_keeps_partial_and_queue_then_restart_finishes_all_in_order(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    catalog = three_model_catalog(tmp_path / "three.yaml")
    hub.throttle(8 << 20, path="model.bin")
    first = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)], name="first")
    store_processes.append(first)
    first.wait_serving()
    pulls = [start_pull(first, "test-tiny")]
    wait_for(lambda: partial_size(data_dir, "test-tiny", "model.bin") > 8_000_000, timeout=60)
    pulls += [start_pull(first, "test-text"), start_pull(first, "test-text-2")]
    wait_for(lambda: get_model(first, "test-text-2").queue_position == 2, timeout=30)

    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(60) == 0, first.stderr()
    for thread, _ in pulls:
        thread.join(10)
    kept = partial_size(data_dir, "test-tiny", "model.bin")
    assert kept > 8_000_000, "a graceful stop must keep the partial file"
    assert (data_dir / "partial" / "test-tiny" / "model.bin.part.json").is_file()
    queue = json.loads((data_dir / "queue.json").read_text())
    assert queue["graceful"] is True
    assert [q["model_id"] for q in queue["queue"]] == ["test-tiny", "test-text", "test-text-2"]
    hub.throttle(None)
    hub.reset_stats()

    second = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)], name="second")
    store_processes.append(second)
    second.wait_serving()
    for model_id in ("test-tiny", "test-text", "test-text-2"):  # no client pulls: the queue resumed
        wait_for(lambda m=model_id: get_model(second, m).state == pb.READY, timeout=120, message=f"{model_id} READY")
    # The one in flight fetched again less than one chunk of what it had.
    assert hub.bytes_served(TINY_REPO, "model.bin") - (MODEL_BIN - kept) < CHUNK
    ranges = [r.headers.get("Range", "") for r in hub.requests if r.path.endswith("/model.bin")]
    assert ranges == [f"bytes={kept}-"]
    # Log lines are written by the logging thread, just after the state they report.
    order = ["test-tiny", "test-text", "test-text-2"]
    wait_for(lambda: len(logged(second, "model ready")) >= len(order), timeout=30, message="every model ready logged")
    assert logged(second, "model ready") == order
    model = get_model(second, "test-tiny")
    assert sha256(Path(model.local_path) / "model.bin") == sha256(TINY_EN_DIR / "model.bin")
    for model_id in ("test-text", "test-text-2"):
        root = Path(get_model(second, model_id).local_path)
        for name, content in text_repo_files().items():
            assert (root / name).read_bytes() == content
    assert json.loads((data_dir / "queue.json").read_text())["queue"] == []


def test_resume_downloads_on_start_off_keeps_partials_but_queues_nothing(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    first = start_store()
    hub.throttle(8 << 20, path="model.bin")
    start_pull(first, "test-tiny")
    wait_for(lambda: partial_size(store_config.data_dir, "test-tiny", "model.bin") > 2_000_000, timeout=60)
    start_pull(first, "test-text")
    wait_for(lambda: get_model(first, "test-text").state == pb.WAITING)
    first.stop()
    kept = partial_size(store_config.data_dir, "test-tiny", "model.bin")
    assert kept > 2_000_000
    hub.throttle(None)
    hub.reset_stats()

    second = start_store(config=store_config, resume_downloads_on_start=False)
    assert second.store.downloads.queue.jobs() == []
    assert get_model(second, "test-tiny").state == pb.INCOMPLETE
    assert get_model(second, "test-text").state == pb.NOT_DOWNLOADED
    assert partial_size(store_config.data_dir, "test-tiny", "model.bin") == kept
    assert hub.requests == []
    assert pull(second, "test-tiny")[-1].state == pb.READY
    assert hub.bytes_served(TINY_REPO, "model.bin") == MODEL_BIN - kept
