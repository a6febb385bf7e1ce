"""voxctl logs over log files written by the real logging set-up of two services: merge in
time order across plain and rotated .gz files, filters, --json, the error summary, follow;
a job's records across both services (its trace ids), on real service processes too."""

from __future__ import annotations

import argparse
import io
import json
import logging
import signal
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tests.hubserver import HubServer
from tests.support import DATA_DIR, InferenceProcess, StoreProcess
from voxctl import logs
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_common.errors import NotFound, Unavailable
from voxserve_common.logfiles import LogFileSettings
from voxserve_common.logs import configure_logging, log_context, stop_logging


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    commands = parser.add_subparsers(dest="command")
    logs.add_parser(commands)
    return parser.parse_args(["logs", *argv])


def voxctl_logs(*argv: str) -> str:
    out = io.StringIO()
    assert logs.run(parse(*argv), out=out, environ={}) == 0
    return out.getvalue()


def write_service_logs(directory: Path, service: str, lines: list[tuple[str, dict[str, object]]]) -> None:
    """Log through the real configure_logging, with rotation small enough to make .gz files."""
    settings = LogFileSettings(directory=directory, max_bytes=1_500, rotate_when="", backup_count=50)
    configure_logging(service, stream=io.StringIO(), files=settings)
    log = logging.getLogger(f"{service}.work")
    for message, fields in lines:
        job = fields.pop("job", None)
        level = int(str(fields.pop("levelno", logging.INFO)))
        error = fields.pop("raise", None)
        trace_id = fields.pop("trace", None)
        span = NonRecordingSpan(
            SpanContext(int(str(trace_id), 16), 0x1234, is_remote=False, trace_flags=TraceFlags(1))
            if trace_id
            else SpanContext(0, 0, is_remote=False)
        )
        with trace.use_span(span), log_context(job_id=job if isinstance(job, str) else None):
            if isinstance(error, Exception):
                try:
                    raise error
                except Exception:
                    log.exception(message, extra=fields)
            else:
                log.log(level, message, extra=fields)
        time.sleep(0.002)  # distinct millisecond timestamps across the two services
    stop_logging()


@pytest.fixture
def two_services(tmp_path: Path, restore_root: None) -> Path:
    directory = tmp_path / "logs"
    store_lines: list[tuple[str, dict[str, object]]] = []
    inference_lines: list[tuple[str, dict[str, object]]] = []
    for index in range(12):
        store_lines.append((f"pull step {index}", {"model_id": "whisper-tiny.en", "job": "job-a"}))
        inference_lines.append((f"segment {index}", {"job": "job-a" if index % 2 else "job-b"}))
    store_lines.append(
        ("hub failed", {"levelno": logging.ERROR, "raise": Unavailable("every hub source failed for 'x'")})
    )
    store_lines.append(
        ("hub failed", {"levelno": logging.ERROR, "raise": Unavailable("every hub source failed for 'y'")})
    )
    inference_lines.append(
        ("rpc finished", {"levelno": logging.WARNING, "error_category": "NotFound", "detail": "no job 'j9'"})
    )
    inference_lines.append(("lookup failed", {"raise": NotFound("model 'm3' is not in the catalog")}))
    write_service_logs(directory, "model_service", store_lines)
    write_service_logs(directory, "inference_service", inference_lines)
    return directory


def test_merges_plain_and_rotated_files_in_time_order(two_services: Path) -> None:
    assert any(p.suffix == ".gz" for p in two_services.iterdir())  # rotation happened
    records = [json.loads(line) for line in voxctl_logs("--log-dir", str(two_services), "--json").splitlines()]
    assert len(records) == 28
    stamps = [r["timestamp"] for r in records]
    assert stamps == sorted(stamps)
    assert {r["service"] for r in records} == {"model_service", "inference_service"}
    store_steps = [r["message"] for r in records if r["message"].startswith("pull step")]
    assert store_steps == [f"pull step {i}" for i in range(12)]  # nothing lost across rotation


def test_filters_by_job_service_level_grep_and_time(two_services: Path) -> None:
    base = ("--log-dir", str(two_services), "--json")
    job_a = [json.loads(line) for line in voxctl_logs(*base, "--job", "job-a").splitlines()]
    assert {r["service"] for r in job_a} == {"model_service", "inference_service"}  # one job across both
    assert len(job_a) == 12 + 6 and all(r["job_id"] == "job-a" for r in job_a)
    inference = voxctl_logs(*base, "--service", "inference_service", "--level", "warning").splitlines()
    assert [json.loads(line)["message"] for line in inference] == ["rpc finished", "lookup failed"]
    assert len(voxctl_logs(*base, "--grep", r"segment (3|5)\b").splitlines()) == 2
    assert voxctl_logs(*base, "--since", "1d", "--until", "2000-01-01T00:00:00Z") == ""
    everything = voxctl_logs(*base, "--since", "1h").splitlines()
    assert len(everything) == 28


def test_readable_lines_show_service_level_and_ids(two_services: Path) -> None:
    lines = voxctl_logs("--log-dir", str(two_services), "--model", "whisper-tiny.en").splitlines()
    assert lines and all("model_service" in line and "model_id=whisper-tiny.en" in line for line in lines)


def test_error_summary_groups_by_category_and_template(two_services: Path) -> None:
    rows = [
        json.loads(line)
        for line in voxctl_logs("--log-dir", str(two_services), "--errors", "--summary", "--json").splitlines()
    ]
    by_key = {(r["category"], r["template"]): r for r in rows}
    hub = by_key[("Unavailable", "hub failed")]
    assert hub["count"] == 2 and hub["services"] == ["model_service"] and hub["first"] < hub["last"]
    assert sum(hub["per_hour"].values()) == 2
    assert by_key[("NotFound", "no job <str>")]["count"] == 1
    assert by_key[("NotFound", "lookup failed")]["count"] == 1
    assert rows[0]["count"] == 2  # most frequent first
    text = voxctl_logs("--log-dir", str(two_services), "--errors", "--summary")
    assert "Unavailable" in text and "first " in text


def test_message_templates_hide_what_varies() -> None:
    assert logs.message_template("pulling 'whisper-base' from /data/models/x: 5 files, 12.5 MiB") == (
        "pulling <str> from <path>: <n> files, <n> MiB"
    )
    assert logs.message_template("job 4bf92f3577b34da6 ended") == "job <id> ended"


def test_a_missing_directory_is_exit_2(tmp_path: Path) -> None:
    assert logs.run(parse("--log-dir", str(tmp_path / "nope")), out=io.StringIO(), environ={}) == 2


def test_follow_prints_records_written_later(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    log_file = directory / "model_service.log"
    log_file.write_text(json.dumps({"timestamp": "2026-01-01T00:00:00.000Z", "message": "old"}) + "\n")
    out = io.StringIO()
    wanted = logs.LogFilter(grep=None)
    offsets = logs.end_offsets(logs.log_files([directory]))
    stop = threading.Event()
    follower = threading.Thread(
        target=logs.follow,
        args=(lambda: logs.log_files([directory]), wanted, out, True, offsets, 0.02, stop),
        daemon=True,
    )
    follower.start()
    deadline = time.monotonic() + 30
    with open(log_file, "a") as handle:
        handle.write(json.dumps({"timestamp": "2026-01-01T00:00:01.000Z", "message": "new"}) + "\n")
        handle.write('{"timestamp": "2026-01-01T00:00:02.000Z", "message": "half')  # not yet a whole line
    while "new" not in out.getvalue():
        assert time.monotonic() < deadline, "follow never printed the new record"
        time.sleep(0.02)
    stop.set()
    follower.join(30)
    assert not follower.is_alive()
    printed = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
    assert printed == ["new"]  # not the old one, not the half-written one


JOB_TRACE, WATCH_TRACE, OTHER_TRACE = "a1" * 16, "b2" * 16, "c3" * 16


def test_job_takes_the_records_that_share_its_trace_ids(tmp_path: Path, restore_root: None) -> None:
    directory = tmp_path / "logs"
    write_service_logs(
        directory,
        "model_service",
        [
            ("pull queued", {"model_id": "whisper-tiny.en", "trace": JOB_TRACE}),
            ("rpc finished", {"trace": JOB_TRACE}),
            ("rpc finished", {"trace": OTHER_TRACE}),  # another request
            ("scan done", {}),  # no trace at all
        ],
    )
    write_service_logs(
        directory,
        "inference_service",
        [
            ("rpc request", {"trace": JOB_TRACE}),  # before the job had its id
            ("job accepted", {"job": "job-a", "trace": JOB_TRACE}),
            ("job accepted", {"job": "job-b", "trace": JOB_TRACE}),  # another job's record in that trace
            ("segment", {"job": "job-a", "trace": JOB_TRACE}),
            ("job watched", {"job": "job-a", "trace": WATCH_TRACE}),  # a WatchJob from another caller
            ("rpc finished", {"trace": WATCH_TRACE}),
            ("rpc finished", {"trace": OTHER_TRACE}),
        ],
    )
    records = [
        json.loads(line) for line in voxctl_logs("--log-dir", str(directory), "--job", "job-a", "--json").splitlines()
    ]
    assert [(r["service"], r["message"]) for r in records] == [
        ("model_service", "pull queued"),
        ("model_service", "rpc finished"),
        ("inference_service", "rpc request"),
        ("inference_service", "job accepted"),
        ("inference_service", "segment"),
        ("inference_service", "job watched"),
        ("inference_service", "rpc finished"),
    ]
    assert {r.get("job_id") for r in records} == {"job-a", None}
    assert {r["trace_id"] for r in records} == {JOB_TRACE, WATCH_TRACE}
    only_store = voxctl_logs("--log-dir", str(directory), "--job", "job-a", "--service", "model_service")
    assert len(only_store.splitlines()) == 2


def test_job_across_both_service_processes(tmp_path: Path, hub: HubServer) -> None:
    """The issue's case: a transcription whose model the store served; the store's records
    of the pull carry the job's trace id, not its job id, and voxctl logs --job shows them."""
    log_dir = tmp_path / "logs"
    store = StoreProcess(tmp_path, tmp_path / "store", hub, extra_args=["--log-dir", str(log_dir)])
    inference: InferenceProcess | None = None
    try:
        store.wait_serving()
        inference = InferenceProcess(
            tmp_path,
            f"127.0.0.1:{store.port}",
            ["--log-dir", str(log_dir)],
            env={"VOXSERVE_DEFAULT_MODEL": "test-tiny"},
        )
        inference.wait_status(1, timeout=120)
        audio = (DATA_DIR / "speech_short.wav").read_bytes()
        request = ipb.TranscribeRequest(options=ipb.TranscribeOptions(job_id="logs-job-1"), audio=audio)
        events = list(inference.stub.Transcribe(request, timeout=300))
        assert events[-1].WhichOneof("event") == "completed"
    finally:
        for process in (inference, store):
            if process is not None and process.process.poll() is None:
                process.process.send_signal(signal.SIGTERM)  # a clean stop flushes the log files
                process.process.wait(60)
            if process is not None:
                process.close()
    records = [
        json.loads(line)
        for line in voxctl_logs("--log-dir", str(log_dir), "--job", "logs-job-1", "--json").splitlines()
    ]
    by_service: dict[str, list[dict[str, object]]] = {}
    for record in records:
        by_service.setdefault(str(record["service"]), []).append(record)
    assert set(by_service) == {"inference_service", "model_service"}
    store_records = by_service["model_service"]
    assert all("job_id" not in r for r in store_records)  # the store never knew the job id
    assert any(r.get("rpc_method") == "/voxserve.modelstore.v1.ModelStore/PullModel" for r in store_records)
    traces = {r["trace_id"] for r in records}
    assert {r["trace_id"] for r in store_records} <= traces
    assert all(r.get("job_id") in (None, "logs-job-1") for r in records)
    everything = voxctl_logs("--log-dir", str(log_dir), "--json").splitlines()
    assert len(everything) > len(records)  # start-up, scan and shutdown records are not the job's
