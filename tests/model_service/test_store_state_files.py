"""State files are untrusted input: one of the wrong shape is moved aside (a log line names
it) and the store starts, rebuilding from the disk as for a truncated file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED
from tests.hubserver import HubServer
from tests.support import TEXT_REPO, TINY_REPO, StoreProcess, pull, text_repo_files
from voxserve.modelstore.v1 import modelstore_pb2 as pb

TEXT_FILES = text_repo_files()


def two_model_catalog(path: Path) -> Path:
    tiny = {"kind": "whisper", "repo_id": TINY_REPO, "allow_patterns": list(WHISPER_FILES),
            "required_files": list(WHISPER_REQUIRED)}  # fmt: skip
    text = {"kind": "whisper", "repo_id": TEXT_REPO, "required_files": ["config.json"]}
    path.write_text(yaml.safe_dump({"models": {"test-tiny": tiny, "test-text": text}}))
    return path


def text_record(state: str = "READY") -> dict[str, Any]:
    """test-text's record as the store writes it."""
    files = [
        {"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "git_oid": "",
         "required": name == "config.json"}
        for name, data in TEXT_FILES.items()
    ]  # fmt: skip
    return {"model_id": "test-text", "state": state, "revision": "", "requested_revision": "main",
            "files": files, "source": "", "error": "", "updated_at": 1.0}  # fmt: skip


def put_text_model_on_disk(data_dir: Path) -> None:
    for name, data in TEXT_FILES.items():
        path = data_dir / "models" / "test-text" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def records(process: StoreProcess) -> list[dict[str, Any]]:
    found = []
    for line in process.stderr().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            found.append(record)
    return found


def start(tmp_path: Path, data_dir: Path, hub: HubServer, store_processes: list[StoreProcess]) -> StoreProcess:
    catalog = two_model_catalog(tmp_path / "two.yaml")
    process = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)])
    store_processes.append(process)
    process.wait_serving()
    return process


def moved_aside(data_dir: Path, name: str) -> list[Path]:
    return sorted(data_dir.glob(f"{name}.broken-*"))


BAD_STATE_FILES = {
    "a list": [],
    "models null": {"version": 1, "models": None},
    "models a string": {"version": 1, "models": "test-text"},
    "a record not an object": {"version": 1, "models": [7]},
    "files of the wrong type": {"version": 1, "models": [{**text_record(), "files": "config.json"}]},
    "a size that is a string": {
        "version": 1,
        "models": [{**text_record(), "files": [{**text_record()["files"][0], "size": "12"}]}],
    },
    "a path that leaves the model": {
        "version": 1,
        "models": [{**text_record(), "files": [{**text_record()["files"][0], "path": "../../state.json"}]}],
    },
    "an unknown state": {"version": 1, "models": [{**text_record(), "state": "DONE"}]},
    "a model id of the wrong type": {"version": 1, "models": [{**text_record(), "model_id": 5}]},
    "a newer version": {"version": "2", "models": []},
}


@pytest.mark.parametrize("shape", list(BAD_STATE_FILES))
def test_state_file_of_the_wrong_shape_is_moved_aside_and_rebuilt_from_disk(
    shape: str, tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    put_text_model_on_disk(data_dir)
    bad = json.dumps(BAD_STATE_FILES[shape])
    (data_dir / "state.json").write_text(bad)

    store = start(tmp_path, data_dir, hub, store_processes)
    aside = moved_aside(data_dir, "state.json")
    assert len(aside) == 1 and aside[0].read_text() == bad
    errors = [r for r in records(store) if r.get("message") == "state file of the wrong shape; moved aside"]
    assert len(errors) == 1, store.stderr()
    assert errors[0]["file"] == str((data_dir / "state.json").resolve())
    assert errors[0]["moved_to"] == str(aside[0].resolve())
    assert errors[0]["problem"]
    # Rebuilt from the disk: the files are there but unverified, the next pull re-hashes them.
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-text"))
    assert model.state == pb.INCOMPLETE
    hub.reset_stats()
    assert pull(store, "test-text")[-1].state == pb.READY
    assert hub.bytes_served(TEXT_REPO) == 0
    state = json.loads((data_dir / "state.json").read_text())
    assert [r["model_id"] for r in state["models"]] == ["test-text"]


def test_one_bad_record_is_dropped_and_the_good_ones_kept(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    put_text_model_on_disk(data_dir)
    bad = json.dumps({"version": 1, "models": [text_record(), {"model_id": "test-tiny", "files": [{"path": 3}]}]})
    (data_dir / "state.json").write_text(bad)

    store = start(tmp_path, data_dir, hub, store_processes)
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).state == pb.READY
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.NOT_DOWNLOADED
    aside = moved_aside(data_dir, "state.json")
    assert len(aside) == 1 and aside[0].read_text() == bad  # the operator keeps the original
    problems = [r for r in records(store) if r.get("message") == "state file of the wrong shape; moved aside"]
    assert len(problems) == 1 and "models[1]" in problems[0]["problem"], problems
    # Rewritten at once with what was good.
    state = json.loads((data_dir / "state.json").read_text())
    assert [(r["model_id"], r["state"]) for r in state["models"]] == [("test-text", "READY")]


BAD_QUEUE_FILES = {
    "a revision that is a number": {
        "version": 1,
        "graceful": True,
        "queue": [{"model_id": "test-text", "revision": 5}],
    },
    "a list": [{"model_id": "test-text"}],
    "queue an object": {"version": 1, "graceful": True, "queue": {"model_id": "test-text"}},
    "graceful a string": {"version": 1, "graceful": "yes", "queue": [], "paused": []},
}


@pytest.mark.parametrize("shape", list(BAD_QUEUE_FILES))
def test_queue_file_of_the_wrong_shape_is_moved_aside_and_nothing_resumed(
    shape: str, tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    bad = json.dumps(BAD_QUEUE_FILES[shape])
    (data_dir / "queue.json").write_text(bad)

    store = start(tmp_path, data_dir, hub, store_processes)
    aside = moved_aside(data_dir, "queue.json")
    assert len(aside) == 1 and aside[0].read_text() == bad
    errors = [r for r in records(store) if r.get("message") == "queue file of the wrong shape; moved aside"]
    assert len(errors) == 1 and errors[0]["file"] == str((data_dir / "queue.json").resolve()), store.stderr()
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).state == pb.NOT_DOWNLOADED
    assert json.loads((data_dir / "queue.json").read_text())["queue"] == []
    assert pull(store, "test-text")[-1].state == pb.READY


@pytest.mark.parametrize("sidecar", ["a directory", "null", "not json"])
def test_partial_sidecar_of_the_wrong_shape_starts_the_file_over(
    sidecar: str, tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    partial = data_dir / "partial" / "test-text"
    partial.mkdir(parents=True)
    (partial / "weights.bin.part").write_bytes(TEXT_FILES["weights.bin"][:100_000])
    path = partial / "weights.bin.part.json"
    if sidecar == "a directory":
        path.mkdir()
        (path / "inside").write_text("not a sidecar")
    else:
        path.write_text("null" if sidecar == "null" else "{not json")

    store = start(tmp_path, data_dir, hub, store_processes)
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).state in (pb.INCOMPLETE, pb.NOT_DOWNLOADED)
    hub.reset_stats()
    assert pull(store, "test-text")[-1].state == pb.READY
    assert hub.bytes_served(TEXT_REPO, "weights.bin") == len(TEXT_FILES["weights.bin"])  # from byte 0
    assert (data_dir / "models" / "test-text" / "weights.bin").read_bytes() == TEXT_FILES["weights.bin"]
    assert not partial.exists()
