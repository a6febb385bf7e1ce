"""JSON (or console) logging with trace_id/span_id and model_id/job_id from context.

Context comes from contextvars and the current OpenTelemetry span, never from string
formatting, so every line a request causes carries the same ids.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import copy
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from voxserve_common.client_strings import escape_line, shown
from voxserve_common.errors import Internal, category_of
from voxserve_common.logfiles import LogFileSettings, RotatingLogFile
from voxserve_common.redaction import RedactingFormatter, Redactor

_model_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("model_id", default=None)
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)
_method: contextvars.ContextVar[str | None] = contextvars.ContextVar("method", default=None)
_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("peer", default=None)
_segment: contextvars.ContextVar[int | None] = contextvars.ContextVar("segment", default=None)

CONTEXT_FIELDS = ("trace_id", "span_id", "model_id", "job_id", "method", "peer", "segment")
_CONTEXT_VARS: dict[str, contextvars.ContextVar[Any]] = {
    "model_id": _model_id,
    "job_id": _job_id,
    "method": _method,
    "peer": _peer,
    "segment": _segment,
}

# Libraries that log per request or per file at INFO; their levels are settings
# (``log_levels``), these are the defaults (never below the root level).
DEFAULT_LIBRARY_LEVELS: Mapping[str, str] = dict.fromkeys(
    (
        "faster_whisper",
        "ctranslate2",
        "huggingface_hub",
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "urllib3",
        "filelock",
        "grpc",
        "torch",
        "onnxruntime",
        "demucs",
    ),
    "WARNING",
)


@contextlib.contextmanager
def log_context(
    *,
    model_id: str | None = None,
    job_id: str | None = None,
    method: str | None = None,
    peer: str | None = None,
    segment: int | None = None,
) -> Iterator[None]:
    """Attach ids (model, job, RPC method, peer, segment index) to every record in the block."""
    given = {"model_id": model_id, "job_id": job_id, "method": method, "peer": peer, "segment": segment}
    tokens = [
        (_CONTEXT_VARS[name], _CONTEXT_VARS[name].set(value)) for name, value in given.items() if value is not None
    ]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Adds service, trace_id, span_id, model_id and job_id to each record."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = getattr(record, "trace_id", None)
            record.span_id = getattr(record, "span_id", None)
        for name, var in _CONTEXT_VARS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        category = error_category(record)
        if category is not None:
            record.error_category = category
        return True


def error_category(record: logging.LogRecord) -> str | None:
    """The error table's class a record is about: given by the code that logged it (a
    failed RPC), else its exception's, else Internal for ERROR and above; None otherwise."""
    given = getattr(record, "error_category", None)
    if given is not None:
        return str(given)
    if record.exc_info and record.exc_info[1] is not None:
        return category_of(record.exc_info[1])
    if record.levelno >= logging.ERROR:
        return Internal.__name__
    return None


def _utc_timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VoxJsonFormatter(JsonFormatter):
    """One JSON object per line: timestamp, level, service, logger, message, ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        # Client strings in fields must not reach a terminal as raw DEL/C1/bidi characters.
        return escape_line(super().format(record))

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["timestamp"] = _utc_timestamp(record)
        log_data["level"] = record.levelname
        log_data["service"] = getattr(record, "service", None)
        log_data["logger"] = record.name
        log_data["module"] = record.module
        log_data["function"] = record.funcName
        log_data["line"] = record.lineno
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is None:
                log_data.pop(field, None)
            else:
                log_data[field] = value


_LEVEL_COLOURS = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[36m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1;31m",
}
_RESET = "\x1b[0m"


class ConsoleFormatter(logging.Formatter):
    """Readable one-line format for people at a terminal, coloured by level when asked."""

    def __init__(self, colour: bool = False) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name}={escape_line(str(getattr(record, name)))}"
            for name in ("model_id", "job_id", "trace_id")
            if getattr(record, name, None)
        )
        level = f"{record.levelname:<7}"
        if self.colour:
            level = f"{_LEVEL_COLOURS.get(record.levelname, '')}{level}{_RESET}"
        line = f"{_utc_timestamp(record)} {level} {record.name}: {record.getMessage()}"
        if ids:
            line += f" [{ids}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


def json_formatter() -> logging.Formatter:
    return VoxJsonFormatter(
        "%(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


class ContextQueueHandler(logging.handlers.QueueHandler):
    """Takes each record's context in the caller's thread, hands the record to the
    listener thread that formats and writes it, so logging never waits on a disk."""

    def __init__(self, queue: queue.Queue[Any], service: str) -> None:
        super().__init__(queue)
        self.addFilter(ContextFilter(service))
        self._plain = logging.Formatter()
        self.listener: logging.handlers.QueueListener | None = None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.message = record.getMessage()
        prepared.msg, prepared.args = prepared.message, None
        if record.exc_info:
            prepared.exc_text = self._plain.formatException(record.exc_info)
            prepared.exc_info = None
        return prepared

    def flush(self) -> None:
        """Block until every record queued so far is written."""
        listener = self.listener
        if listener is not None and getattr(listener, "_thread", None) is not None:
            self.queue.join()  # type: ignore[attr-defined]
            for handler in listener.handlers:
                handler.flush()

    def stop(self) -> None:
        """Write what is queued, then stop the listener (at shutdown; idempotent)."""
        listener, self.listener = self.listener, None
        if listener is not None and getattr(listener, "_thread", None) is not None:
            listener.stop()
            for handler in listener.handlers:
                handler.close()


def level_number(level: str, logger_name: str = "root") -> int:
    """The number of a level name (DEBUG ... CRITICAL); ValueError naming the logger otherwise."""
    number = logging.getLevelNamesMapping().get(level.upper())
    if number is None:
        raise ValueError(
            f"log level of {shown(logger_name)} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {shown(level)}"
        )
    return number


_active: ContextQueueHandler | None = None


def stop_logging() -> None:
    """Flush and stop the log listener (atexit runs it too, so SIGTERM exits lose nothing)."""
    global _active
    if _active is not None:
        _active.stop()
        _active = None


atexit.register(stop_logging)


def configure_logging(
    service: str,
    *,
    level: str = "INFO",
    fmt: str = "json",
    stream: Any = None,
    files: LogFileSettings | None = None,
    redactor: Redactor | None = None,
    library_levels: Mapping[str, str] | None = None,
) -> ContextQueueHandler:
    """Route the root logger through a queue to: ``stream`` (stderr) in ``fmt`` ("json",
    "console", or "auto" = console on a terminal), and, when files has a directory,
    ``<service>.log`` and ``<service>.error.log`` (JSON, rotated). Every handler redacts
    secrets (``redactor`` knows the configured ones). Returns the root's handler."""
    global _active
    root_level = level_number(level)
    levels = {
        name: max(level_number(value, name), root_level)
        for name, value in {**DEFAULT_LIBRARY_LEVELS, **(library_levels or {})}.items()
    }
    redactor = redactor or Redactor()
    output = stream or sys.stderr
    tty = bool(getattr(output, "isatty", lambda: False)())
    if fmt == "auto":
        fmt = "console" if tty else "json"
    if fmt == "json":
        formatter = json_formatter()
    elif fmt == "console":
        formatter = ConsoleFormatter(colour=tty and not os.environ.get("NO_COLOR"))
    else:
        raise ValueError(f"log format must be 'json', 'console' or 'auto', not {fmt!r}")
    handler = logging.StreamHandler(output)
    handler.setFormatter(RedactingFormatter(formatter, redactor))
    handlers: list[logging.Handler] = [handler]
    if files is not None and files.directory is not None:
        for name, file_level in ((f"{service}.log", logging.NOTSET), (f"{service}.error.log", logging.ERROR)):
            file_handler = RotatingLogFile(files.directory / name, files, level=file_level)
            file_handler.setFormatter(RedactingFormatter(json_formatter(), redactor))
            handlers.append(file_handler)
    stop_logging()
    records: queue.Queue[Any] = queue.Queue()
    root_handler = ContextQueueHandler(records, service)
    root_handler.listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root_handler.listener.start()
    _active = root_handler
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(root_handler)
    root.setLevel(root_level)
    for name, number in levels.items():
        logging.getLogger(name).setLevel(number)
    return root_handler
