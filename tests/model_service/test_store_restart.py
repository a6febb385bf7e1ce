"""Restarts: the disk is the truth; repairs fetch only what is missing or wrong."""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreHandle,
    StoreProcess,
    get_model,
    kill_mid_download,
    pull,
    sha256,
    text_repo_files,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb

TEXT_SIZES = {name: len(data) for name, data in text_repo_files().items()}


def state_json(data_dir: Path) -> dict[str, dict]:
    """state.json parsed (fails the test if it is not valid JSON), keyed by model id."""
    payload = json.loads((data_dir / "state.json").read_text())
    assert payload["version"] == 1
    return {record["model_id"]: record for record in payload["models"]}


def failures(handle: StoreHandle, model_id: str) -> float:
    return handle.store.metrics.verification_failures.labels(model_id)._value.get()


def test_restart_marks_missing_file_incomplete_and_pull_fetches_only_it(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    first = start_store()
    assert pull(first, "test-text")[-1].state == pb.READY
    assert state_json(store_config.data_dir)["test-text"]["state"] == "READY"
    first.stop()
    assert state_json(store_config.data_dir)["test-text"]["state"] == "READY"
    (store_config.data_dir / "models" / "test-text" / "sub" / "notes.txt").unlink()

    second = start_store(config=store_config)
    assert second.store.scan_done.is_set()
    model = get_model(second, "test-text")
    assert model.state == pb.INCOMPLETE
    assert {f.path: f.present for f in model.files} == {
        "config.json": True,
        "weights.bin": True,
        "sub/notes.txt": False,
    }
    assert state_json(store_config.data_dir)["test-text"]["state"] == "INCOMPLETE"

    hub.reset_stats()
    assert pull(second, "test-text")[-1].state == pb.READY
    assert hub.bytes_served(TEXT_REPO, "sub/notes.txt") == TEXT_SIZES["sub/notes.txt"]
    assert hub.bytes_served(TEXT_REPO, "weights.bin") == 0
    assert hub.bytes_served(TEXT_REPO, "config.json") == 0
    assert hub.bytes_served(TEXT_REPO) == TEXT_SIZES["sub/notes.txt"]
    root = Path(get_model(second, "test-text").local_path)
    for name, content in text_repo_files().items():
        assert (root / name).read_bytes() == content
    assert state_json(store_config.data_dir)["test-text"]["state"] == "READY"


def test_silent_same_size_corruption_found_by_verify_and_repaired(store: StoreHandle, hub: HubServer) -> None:
    assert pull(store, "test-text")[-1].state == pb.READY
    weights = store.store.model_dir("test-text") / "weights.bin"
    original = weights.read_bytes()
    weights.write_bytes(bytes(reversed(original)))  # same size, other bytes
    before = failures(store, "test-text")

    result = store.stub.VerifyModel(pb.VerifyModelRequest(model_id="test-text"))
    assert not result.ok
    checks = {c.path: c for c in result.files}
    assert checks["weights.bin"].problem == "sha256 mismatch"
    assert checks["weights.bin"].actual_size == checks["weights.bin"].expected_size == len(original)
    assert checks["weights.bin"].expected_sha256 == hashlib.sha256(original).hexdigest()
    assert checks["config.json"].ok and checks["sub/notes.txt"].ok
    assert result.model.state == pb.INCOMPLETE
    assert get_model(store, "test-text").state == pb.INCOMPLETE
    assert failures(store, "test-text") == before + 1
    assert state_json(store.store.data_dir)["test-text"]["state"] == "INCOMPLETE"

    hub.reset_stats()
    assert pull(store, "test-text")[-1].state == pb.READY
    assert hub.bytes_served(TEXT_REPO) == len(original)
    assert hub.bytes_served(TEXT_REPO, "weights.bin") == len(original)
    assert weights.read_bytes() == original
    assert store.stub.VerifyModel(pb.VerifyModelRequest(model_id="test-text")).ok
    assert state_json(store.store.data_dir)["test-text"]["state"] == "READY"


def test_crash_mid_download_never_comes_back_ready_with_partial_files(
    tmp_path: Path,
    start_store: Callable[..., StoreHandle],
    store_config: ModelStoreConfig,
    hub: HubServer,
    store_processes: list[StoreProcess],
) -> None:
    kill_mid_download(tmp_path, store_config.data_dir, hub, store_processes, min_bytes=4_000_000)
    recorded = state_json(store_config.data_dir)  # valid JSON although the writer was killed
    assert recorded["test-tiny"]["state"] in ("DOWNLOADING", "WAITING", "VERIFYING")

    handle = start_store(config=store_config)
    model = get_model(handle, "test-tiny")
    assert model.state in (pb.INCOMPLETE, pb.NOT_DOWNLOADED)
    assert state_json(store_config.data_dir)["test-tiny"]["state"] in ("INCOMPLETE", "NOT_DOWNLOADED")
    expected_sizes = {f.path: f.size for f in model.files}
    assert expected_sizes["model.bin"] == (TINY_EN_DIR / "model.bin").stat().st_size
    model_dir = store_config.data_dir / "models" / "test-tiny"
    on_disk = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in model_dir.rglob("*") if p.is_file()}
    assert "model.bin" not in on_disk
    for name, size in on_disk.items():
        assert expected_sizes[name] == size, f"{name} on disk has the wrong size"
    assert not model.files or not all(f.present for f in model.files)


def _tree_entry(hub: HubServer, repo_id: str, path: str) -> dict:
    with urllib.request.urlopen(f"{hub.endpoint}/api/models/{repo_id}/tree/main?recursive=true") as response:
        entries = json.load(response)
    return next(e for e in entries if e["path"] == path)


def test_orphans_removed_at_start_and_valid_partial_kept(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    data_dir = store_config.data_dir
    unknown = data_dir / "partial" / "unknown-model" / "x.part"
    no_sidecar = data_dir / "partial" / "test-text" / "orphan.bin.part"
    junk = data_dir / "staging" / "junk"
    for path in (unknown, no_sidecar, junk):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left over")
    # A resumable partial of model.bin: the first 10 MB and the sidecar naming that file version.
    kept_bytes = 10_000_000
    valid = data_dir / "partial" / "test-tiny" / "model.bin.part"
    valid.parent.mkdir(parents=True)
    with open(TINY_EN_DIR / "model.bin", "rb") as source:
        valid.write_bytes(source.read(kept_bytes))
    entry = _tree_entry(hub, TINY_REPO, "model.bin")
    sidecar = {
        "repo_id": TINY_REPO,
        "commit": hub.commit(TINY_REPO),
        "path": "model.bin",
        "size": entry["size"],
        "sha256": entry["lfs"]["oid"],
        "git_oid": entry["oid"],
    }
    valid.with_name("model.bin.part.json").write_text(json.dumps(sidecar))

    handle = start_store()
    assert handle.store.scan_done.is_set()
    assert not unknown.exists() and not unknown.parent.exists()
    assert not no_sidecar.exists()
    assert not junk.exists()
    assert valid.is_file() and valid.stat().st_size == kept_bytes
    assert valid.with_name("model.bin.part.json").is_file()
    # Nothing resumable is left for test-text: it has nothing on disk.
    assert get_model(handle, "test-text").state == pb.NOT_DOWNLOADED
    assert get_model(handle, "test-tiny").state == pb.INCOMPLETE

    hub.reset_stats()
    assert pull(handle, "test-tiny")[-1].state == pb.READY
    size = (TINY_EN_DIR / "model.bin").stat().st_size
    assert hub.bytes_served(TINY_REPO, "model.bin") == size - kept_bytes
    assert sha256(handle.store.model_dir("test-tiny") / "model.bin") == entry["lfs"]["oid"]


def test_ready_model_survives_restart_without_network(
    start_store: Callable[..., StoreHandle], store_config: ModelStoreConfig, hub: HubServer
) -> None:
    first = start_store()
    pull(first, "test-text")
    first.stop()
    hub.stop()  # no network after restart: a READY model must not need it
    second = start_store(config=store_config)
    assert get_model(second, "test-text").state == pb.READY
    events = pull(second, "test-text")
    assert len(events) == 1 and events[0].state == pb.READY
