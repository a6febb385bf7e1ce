"""Log records: code location and context fields, console colours, library levels, the
queue listener (records written off the caller's thread, all of them by stop)."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from voxserve_common.logs import configure_logging, log_context, stop_logging


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("restore_root")


def emit_in_context() -> None:
    method = "/voxserve.inference.v1.Inference/Transcribe"
    with (
        log_context(model_id="m1", job_id="j1", method=method, peer="ipv4:10.0.0.1:5"),
        log_context(segment=3),  # an inner block adds to the outer one's context
    ):
        logging.getLogger("voxserve.test").info("segment decoded")


def test_records_carry_code_location_and_context() -> None:
    stream = io.StringIO()
    handler = configure_logging("unit", stream=stream)
    emit_in_context()
    handler.flush()
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert (line["module"], line["function"]) == ("test_log_records", "emit_in_context")
    assert isinstance(line["line"], int) and line["line"] > 0
    assert line["method"] == "/voxserve.inference.v1.Inference/Transcribe" and line["peer"] == "ipv4:10.0.0.1:5"
    assert (line["model_id"], line["job_id"], line["segment"]) == ("m1", "j1", 3)


def test_context_is_taken_in_the_callers_thread() -> None:
    stream = io.StringIO()
    handler = configure_logging("unit", stream=stream)
    threads = [threading.Thread(target=lambda i=i: _log_job(f"job-{i}")) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handler.flush()
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert sorted((line["job_id"], line["message"]) for line in lines) == [
        (f"job-{i}", f"work of job-{i}") for i in range(4)
    ]


def _log_job(job_id: str) -> None:
    with log_context(job_id=job_id):
        logging.getLogger("voxserve.test").info("work of %s", job_id)


def test_records_are_written_off_the_callers_thread_and_all_by_stop() -> None:
    writers: list[str] = []

    class RecordingStream(io.StringIO):
        def write(self, text: str) -> int:
            writers.append(threading.current_thread().name)
            return super().write(text)

    stream = RecordingStream()
    configure_logging("unit", stream=stream)
    for index in range(500):
        logging.getLogger("voxserve.test").info("line %d", index)
    stop_logging()
    lines = stream.getvalue().splitlines()
    assert [json.loads(text)["message"] for text in lines] == [f"line {i}" for i in range(500)]
    assert threading.current_thread().name not in writers


def test_console_format_colours_on_a_tty_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    tty = TtyStream()
    handler = configure_logging("unit", fmt="auto", stream=tty)
    logging.getLogger("voxserve.test").warning("disk nearly full")
    handler.flush()
    coloured = tty.getvalue()
    assert "\x1b[33mWARNING" in coloured and "disk nearly full" in coloured
    assert not coloured.lstrip().startswith("{")  # auto on a terminal is the console format

    monkeypatch.setenv("NO_COLOR", "1")
    plain_tty = TtyStream()
    handler = configure_logging("unit", fmt="console", stream=plain_tty)
    logging.getLogger("voxserve.test").warning("disk nearly full")
    handler.flush()
    assert "\x1b[" not in plain_tty.getvalue() and "WARNING" in plain_tty.getvalue()

    piped = io.StringIO()
    handler = configure_logging("unit", fmt="auto", stream=piped)
    logging.getLogger("voxserve.test").warning("disk nearly full")
    handler.flush()
    assert json.loads(piped.getvalue())["message"] == "disk nearly full"  # auto off a terminal is JSON


def test_library_levels_are_settings_with_defaults() -> None:
    configure_logging("unit", stream=io.StringIO(), level="DEBUG")
    assert logging.getLogger("faster_whisper").level == logging.WARNING
    configure_logging("unit", stream=io.StringIO(), level="DEBUG", library_levels={"faster_whisper": "debug"})
    assert logging.getLogger("faster_whisper").level == logging.DEBUG
    with pytest.raises(ValueError, match="'faster_whisper'"):
        configure_logging("unit", stream=io.StringIO(), library_levels={"faster_whisper": "loud"})
