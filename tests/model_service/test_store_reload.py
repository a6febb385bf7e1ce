"""SIGHUP on a real store process: the reloadable settings (heartbeat, progress rate, breakers,
retries, hub timeout, disk reserve) change without a restart; the others are reported as
needing one."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import grpc
import yaml

from tests.hubserver import HubServer
from tests.support import TEXT_REPO, StoreProcess, pull, wait_for
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def records(process: StoreProcess, message: str) -> list[dict[str, Any]]:
    """Every JSON log record of ``process`` with this message, in order."""
    found = []
    for line in process.stderr().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("message") == message:
            found.append(record)
    return found


def text_catalog(path: Path) -> Path:
    """A catalog with one small model (2 MiB weights.bin) from the loopback hub."""
    entry = {"kind": "whisper", "repo_id": TEXT_REPO, "revision": "main", "required_files": ["config.json"]}
    path.write_text(yaml.safe_dump({"models": {"test-text": entry}}))
    return path


def weights_progress(events: list[pb.ModelEvent]) -> list[pb.ModelEvent]:
    return [e for e in events if e.type == pb.PROGRESS and e.current_file == "weights.bin"]


def heartbeats(process: StoreProcess, count: int) -> int:
    """Read a new WatchModels stream until ``count`` heartbeats came (or its deadline)."""
    seen = 0
    call = process.stub.WatchModels(pb.WatchModelsRequest(types=[pb.HEARTBEAT]), timeout=60)
    try:
        for event in call:
            if event.type == pb.HEARTBEAT:
                seen += 1
                if seen >= count:
                    break
    finally:
        call.cancel()
    return seen


def test_sighup_applies_heartbeat_and_progress_rate_and_reports_the_rest(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    config = tmp_path / "store.yaml"
    # One PROGRESS event per 100 s and one heartbeat per hour: nothing of either shows in
    # a test unless the reload changed them.
    config.write_text(yaml.safe_dump({"heartbeat_seconds": 3600, "progress_events_per_second": 0.01}))
    catalog = text_catalog(tmp_path / "text.yaml")
    store = StoreProcess(
        tmp_path, tmp_path / "data", hub, extra_args=["--config", str(config), "--catalog", str(catalog)]
    )
    store_processes.append(store)
    store.wait_serving()
    store.stub.ListModels(pb.ListModelsRequest(), timeout=30)

    hub.throttle(1 << 20, path="weights.bin")  # about 2 s for weights.bin
    slow = pull(store, "test-text")
    assert slow[-1].state == pb.READY
    assert len(weights_progress(slow)) <= 2  # the forced first one (and at most one more)

    config.write_text(
        yaml.safe_dump(
            {
                "heartbeat_seconds": 0.2,
                "progress_events_per_second": 1000,
                "breaker_failures": 5,
                "download_retries": 4,
                "max_concurrent_downloads": 2,
            }
        )
    )
    store.process.send_signal(signal.SIGHUP)
    reloaded = wait_for(lambda: records(store, "settings reloaded"), timeout=30, message="settings reloaded")[-1]
    assert set(reloaded["applied"]) == {
        "heartbeat_seconds",
        "progress_events_per_second",
        "breaker_failures",
        "download_retries",
    }
    assert reloaded["needs_restart"] == ["max_concurrent_downloads"]
    warning = records(store, "some changed settings take effect only after a restart")[-1]
    assert warning["settings"] == ["max_concurrent_downloads"] and warning["level"] == "WARNING"

    # A stream opened now gets the new heartbeat (the old one would take an hour).
    assert heartbeats(store, 3) == 3

    # The same download again, now at 1000 PROGRESS events a second.
    store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-text"), timeout=30)
    fast = pull(store, "test-text")
    hub.throttle(None)
    assert fast[-1].state == pb.READY
    progress = weights_progress(fast)
    assert len(progress) > 5, len(progress)
    done = [e.bytes_done for e in progress]
    assert done == sorted(done)

    # A second SIGHUP with the same file changes nothing more: it compares against the
    # settings now in force.
    count = len(records(store, "settings reloaded"))
    store.process.send_signal(signal.SIGHUP)
    wait_for(lambda: len(records(store, "settings reloaded")) > count, timeout=30, message="second reload")
    again = records(store, "settings reloaded")[-1]
    assert again["applied"] == [] and again["needs_restart"] == ["max_concurrent_downloads"]


def test_sighup_with_an_invalid_reloadable_value_keeps_the_running_settings(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(yaml.safe_dump({"heartbeat_seconds": 3600}))
    store = StoreProcess(tmp_path, tmp_path / "data", hub, extra_args=["--config", str(config)])
    store_processes.append(store)
    store.wait_serving()
    config.write_text(yaml.safe_dump({"heartbeat_seconds": -1}))
    store.process.send_signal(signal.SIGHUP)
    failed = wait_for(
        lambda: records(store, "settings not reloaded; the running ones stay in force"),
        timeout=30,
        message="reload refused",
    )[-1]
    assert failed["level"] == "ERROR"
    assert "invalid setting heartbeat_seconds" in store.stderr()  # the loader's reason, naming the key
    received = []
    try:  # still the hourly heartbeat: none on a new stream within its deadline
        for event in store.stub.WatchModels(pb.WatchModelsRequest(types=[pb.HEARTBEAT]), timeout=3):
            received.append(event)
            break
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received == []
    assert store.process.poll() is None
