"""At DEBUG a pull shows each store-side step: the source choice and why, every HTTP
request to the hub (URL, status, bytes, time), the plan, each file moved into place, the
verification. A credentialed endpoint's password shows nowhere: not in the records the
store makes, not in the JSON log output (in-process with caplog, and a real process)."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.hubserver import HubServer, refused_endpoint
from tests.support import TEXT_REPO, StoreHandle, StoreProcess, pull, text_repo_files
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.logs import json_formatter
from voxserve_common.redaction import RedactingFormatter, Redactor

PASSWORD = "mirror-pass-4711"
DOWNLOAD_LOGGERS = "model_service.store.download"


@pytest.fixture
def debug(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="model_service")
    return caplog


def credentialed(endpoint: str) -> str:
    return endpoint.replace("http://", f"http://voxserve:{PASSWORD}@")


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra=`` fields of a record (what the JSON output adds to the message)."""
    plain = logging.LogRecord("", 0, "", 0, "", None, None).__dict__
    return {k: v for k, v in record.__dict__.items() if k not in plain and k not in ("message", "asctime")}


def lines(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [fields(r) for r in caplog.records if r.getMessage() == message and r.name.startswith("model_service")]


def manifest_choices(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The source choice lines of manifests (those of files name the file)."""
    return [c for c in lines(caplog, "source choice") if "file" not in c]


def test_a_pull_at_debug_shows_each_step_and_every_hub_request(
    debug: pytest.LogCaptureFixture, start_store: Callable[..., StoreHandle], hub: HubServer
) -> None:
    store = start_store(hub_endpoints=(f"mirror={credentialed(hub.endpoint)}",))
    files = text_repo_files()

    events = pull(store, "test-text")

    assert events[-1].state == pb.READY
    (started,) = lines(debug, "download started")
    assert started["revision"] == "main" and started["waited_seconds"] >= 0
    (choice,) = manifest_choices(debug)
    assert (choice["endpoint"], choice["why"]) == (hub.endpoint, "first healthy")
    file_choices = [c for c in lines(debug, "source choice") if "file" in c]
    assert sorted((c["file"], c["endpoint"], c["why"]) for c in file_choices) == [
        (name, hub.endpoint, "the manifest's source") for name in sorted(files)
    ]
    requests = lines(debug, "hub request")
    (manifest,) = [r for r in requests if "/api/models/" in r["url"]]
    assert manifest["url"].startswith(f"{hub.endpoint}/api/models/{TEXT_REPO}/revision/main")
    assert manifest["method"] == "GET" and manifest["status"] == 200 and manifest["bytes"] > 0
    by_file = {r["url"].rpartition(f"/{hub.commit(TEXT_REPO)}/")[2]: r for r in requests if r is not manifest}
    assert set(by_file) == set(files)
    for name, data in files.items():
        assert by_file[name]["status"] == 200 and by_file[name]["bytes"] == len(data), by_file[name]
        assert by_file[name]["seconds"] >= 0
    (planned,) = lines(debug, "download planned")
    assert sorted(planned["to_fetch"]) == sorted(files) and planned["needed_bytes"] == sum(map(len, files.values()))
    assert sorted(r["file"] for r in lines(debug, "file moved into place")) == sorted(files)
    (verifying,) = lines(debug, "verification started")
    assert verifying["files"] == len(files) and verifying["rehash_bytes"] == 0

    mine = [r for r in debug.records if r.name.startswith(DOWNLOAD_LOGGERS) and r.levelno == logging.DEBUG]
    assert mine and all(PASSWORD not in f"{r.getMessage()} {fields(r)}" for r in mine)
    output = RedactingFormatter(json_formatter(), Redactor())
    assert all(PASSWORD not in output.format(r) for r in debug.records)


def test_debug_says_why_a_source_was_chosen_skipped_or_fallen_back_to(
    debug: pytest.LogCaptureFixture, start_store: Callable[..., StoreHandle], hub: HubServer
) -> None:
    down = refused_endpoint()
    store = start_store(hub_endpoints=(f"down={down}", f"mirror={hub.endpoint}"), breaker_failures=1)

    assert pull(store, "test-text")[-1].state == pb.READY
    (failed,) = lines(debug, "hub request failed")
    assert failed["url"].startswith(f"{down}/api/models/") and failed["error"].startswith("connection failed")
    assert [(c["endpoint"], c["why"]) for c in manifest_choices(debug)] == [(hub.endpoint, "fallback")]

    debug.clear()
    store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-text"), timeout=10)
    assert pull(store, "test-text")[-1].state == pb.READY  # the breaker of "down" is open now
    (skipped,) = lines(debug, "source skipped: circuit open")
    assert skipped["endpoint"] == down and skipped["reason"].startswith("circuit open")
    assert [(c["endpoint"], c["why"]) for c in manifest_choices(debug)] == [(hub.endpoint, "first healthy")]
    assert not lines(debug, "hub request failed")


def test_the_json_log_output_at_debug_never_shows_an_endpoint_password(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    mirror = f"mirror={credentialed(hub.endpoint)}"
    process = StoreProcess(
        tmp_path, tmp_path / "data", hub, extra_args=["--hub-endpoint", mirror, "--log-level", "DEBUG"]
    )
    store_processes.append(process)
    process.wait_serving()

    events = list(process.stub.PullModel(pb.PullModelRequest(model_id="test-tiny", source="mirror"), timeout=60))
    assert events[-1].state == pb.READY
    files = process.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"), timeout=10).files
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(30) == 0

    stderr = process.stderr()
    assert PASSWORD not in stderr
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    requests = [r for r in records if r["message"] == "hub request"]
    assert len(requests) == 1 + len(files)
    assert all(r["url"].startswith(hub.endpoint + "/") and r["status"] == 200 for r in requests)
    # Each line of a pull's steps carries the pull's model and job (from the log context).
    steps = [r for r in records if r["logger"].startswith(DOWNLOAD_LOGGERS) and r["level"] == "DEBUG"]
    assert {(r.get("model_id"), bool(r.get("job_id"))) for r in steps} == {("test-tiny", True)}
    assert len({r["job_id"] for r in steps}) == 1
    choices = [r for r in records if r["message"] == "source choice" and "file" not in r]
    assert [(c["endpoint"], c["why"]) for c in choices] == [(hub.endpoint, "requested")]


def test_an_unknown_source_is_refused_without_showing_a_configured_password(
    start_store: Callable[..., StoreHandle], hub: HubServer
) -> None:
    store = start_store(hub_endpoints=(f"mirror={credentialed(hub.endpoint)}",))
    with pytest.raises(grpc.RpcError) as raised:
        list(store.stub.PullModel(pb.PullModelRequest(model_id="test-text", source="nowhere"), timeout=30))
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "mirror" in error.details() and hub.endpoint in error.details()
    assert PASSWORD not in error.details()
