"""Verification progress (issue 8): VERIFYING re-hashes the files a pull kept from disk
with PROGRESS events of its own (verify_bytes_done/verify_bytes_total), ImportModel reports
its hashing copy the same way; on real stores, the loopback hub and the real client."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from model_service.catalog import CatalogEntry
from tests.hubserver import HubServer
from tests.support import StoreHandle, get_model, make_catalog, pull, sha256, wait_for
from voxserve.modelstore.v1 import modelstore_pb2 as pb

BIG_REPO = "test-org/big-file"
BIG_SIZE = 6 << 20  # a few MB: with 64 KiB hash blocks, ~100 blocks to report
BLOCK = 64 << 10


@pytest.fixture
def big_files(hub: HubServer) -> dict[str, bytes]:
    files = {"config.json": b'{"name": "big"}\n', "big.bin": os.urandom(BIG_SIZE)}
    hub.add_repo(BIG_REPO, files)
    return files


@pytest.fixture
def big_store(start_store: Callable[..., StoreHandle], big_files: dict[str, bytes]) -> StoreHandle:
    catalog = {
        **make_catalog(),
        "test-big": CatalogEntry("test-big", "whisper", BIG_REPO, "main", (), ("config.json",), "one big file"),
    }
    return start_store(catalog=catalog, download_chunk_bytes=BLOCK, progress_events_per_second=10_000)


def verifying(events: list[pb.ModelEvent]) -> list[pb.ModelEvent]:
    return [e for e in events if e.state == pb.VERIFYING and e.type in (pb.PROGRESS, pb.STATE_CHANGED)]


def states(events: list[pb.ModelEvent]) -> list[int]:
    return [e.state for e in events if e.type == pb.STATE_CHANGED]


def make_incomplete(store: StoreHandle, model_id: str, remove: str) -> Path:
    """Remove one file of a READY model and let VerifyModel find it: INCOMPLETE, so the
    next pull trusts nothing on disk and re-hashes what it keeps."""
    model_dir = Path(get_model(store, model_id).local_path)
    (model_dir / remove).unlink()
    result = store.stub.VerifyModel(pb.VerifyModelRequest(model_id=model_id), timeout=60)
    assert not result.ok and result.model.state == pb.INCOMPLETE
    return model_dir


def assert_verify_progress_is_monotonic_and_complete(events: list[pb.ModelEvent], total: int) -> None:
    checked = [e for e in verifying(events) if e.verify_bytes_total]
    assert checked, "no VERIFYING event carried verification totals"
    assert {e.verify_bytes_total for e in checked} == {total}
    done = [e.verify_bytes_done for e in checked]
    assert done == sorted(done), done
    assert done[-1] == total


def test_a_fresh_pull_hashes_while_writing_and_verifying_says_nothing_was_rehashed(big_store: StoreHandle) -> None:
    events = pull(big_store, "test-big")
    assert events[-1].state == pb.READY
    checks = verifying(events)
    assert checks and all(e.verify_bytes_total == 0 and e.verify_bytes_done == 0 for e in checks)
    assert all(e.bytes_done == e.bytes_total == BIG_SIZE + 16 for e in checks)  # the transfer totals


def test_files_kept_from_disk_are_rehashed_while_verifying_with_progress_events(
    big_store: StoreHandle, hub: HubServer, big_files: dict[str, bytes]
) -> None:
    pull(big_store, "test-big")
    model_dir = make_incomplete(big_store, "test-big", "config.json")
    hub.reset_stats()

    events = pull(big_store, "test-big")
    assert events[-1].state == pb.READY
    assert states(events)[-2:] == [pb.VERIFYING, pb.READY]
    # big.bin was kept (its size is right) and re-hashed in VERIFYING, not fetched again.
    assert hub.bytes_served(BIG_REPO, "big.bin") == 0
    assert hub.bytes_served(BIG_REPO, "config.json") == len(big_files["config.json"])
    assert_verify_progress_is_monotonic_and_complete(events, BIG_SIZE)
    progress = [e for e in verifying(events) if e.type == pb.PROGRESS]
    assert len(progress) >= 3, len(progress)  # several events for one large file
    assert {e.current_file for e in progress} == {"big.bin"}
    # The transfer totals stay where the download left them: the bar never goes back.
    total = sum(len(b) for b in big_files.values())
    assert all(e.bytes_done == e.bytes_total == total for e in verifying(events))
    counted = [e.bytes_done for e in events if e.type in (pb.PROGRESS, pb.STATE_CHANGED) and e.bytes_total]
    assert counted == sorted(counted)
    model = get_model(big_store, "test-big")
    assert model.state == pb.READY
    assert {f.path: f.sha256 for f in model.files}["big.bin"] == sha256(model_dir / "big.bin")


def test_a_kept_file_that_fails_its_rehash_is_fetched_again_then_ready(
    big_store: StoreHandle, hub: HubServer, big_files: dict[str, bytes]
) -> None:
    pull(big_store, "test-big")
    model_dir = Path(get_model(big_store, "test-big").local_path)
    with open(model_dir / "big.bin", "r+b") as handle:  # same size, different bytes
        handle.seek(BIG_SIZE // 2)
        handle.write(b"\x00" if big_files["big.bin"][BIG_SIZE // 2] else b"\x01")
    make_incomplete(big_store, "test-big", "config.json")
    hub.reset_stats()

    events = pull(big_store, "test-big")
    assert events[-1].state == pb.READY
    assert states(events)[-4:] == [pb.VERIFYING, pb.DOWNLOADING, pb.VERIFYING, pb.READY]
    assert hub.bytes_served(BIG_REPO, "big.bin") == BIG_SIZE
    assert (model_dir / "big.bin").read_bytes() == big_files["big.bin"]
    first_check = events[: next(i for i, e in enumerate(events) if e.state == pb.READY)]
    assert_verify_progress_is_monotonic_and_complete([e for e in first_check if e.verify_bytes_total], BIG_SIZE)


def watch_until_ready(store: StoreHandle, model_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    """A WatchModels stream of one model read in the background until a READY change."""
    result: dict[str, Any] = {"events": [], "live": threading.Event()}

    def run() -> None:
        call = store.stub.WatchModels(pb.WatchModelsRequest(model_ids=[model_id]), timeout=120)
        try:
            for event in call:
                if event.type == pb.SNAPSHOT_END:
                    result["live"].set()
                    continue
                if event.type in (pb.SNAPSHOT, pb.HEARTBEAT):
                    continue
                result["events"].append(event)
                if event.type == pb.STATE_CHANGED and event.state == pb.READY:
                    break
        except grpc.RpcError as error:
            result["error"] = error
        finally:
            call.cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(result["live"].is_set, timeout=30, message="watch stream live")
    return thread, result


def test_import_reports_its_hashing_copy_as_verification_progress(
    big_store: StoreHandle, tmp_path: Path, big_files: dict[str, bytes]
) -> None:
    source = tmp_path / "import-src"
    source.mkdir()
    for name, content in big_files.items():
        (source / name).write_bytes(content)
    thread, result = watch_until_ready(big_store, "test-big")
    model = big_store.stub.ImportModel(pb.ImportModelRequest(model_id="test-big", source_dir=str(source)), timeout=120)
    assert model.state == pb.READY
    thread.join(60)
    events = result["events"]
    assert "error" not in result and events[-1].state == pb.READY
    total = sum(len(b) for b in big_files.values())
    assert_verify_progress_is_monotonic_and_complete(events, total)
    assert len([e for e in events if e.type == pb.PROGRESS and e.state == pb.VERIFYING]) >= 3
    assert events[-1].bytes_done == events[-1].bytes_total == total
