"""JSON (or console) logging with trace_id/span_id and model_id/job_id from context.

Context comes from contextvars and the current OpenTelemetry span, never from string
formatting, so every line a request causes carries the same ids.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from voxserve_common.logfiles import LogFileSettings, RotatingLogFile
from voxserve_common.redaction import RedactingFormatter, Redactor

_model_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("model_id", default=None)
_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)

CONTEXT_FIELDS = ("trace_id", "span_id", "model_id", "job_id")


@contextlib.contextmanager
def log_context(*, model_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Attach model_id / job_id to every log record emitted inside the block."""
    tokens = []
    if model_id is not None:
        tokens.append((_model_id, _model_id.set(model_id)))
    if job_id is not None:
        tokens.append((_job_id, _job_id.set(job_id)))
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
        if getattr(record, "model_id", None) is None:
            record.model_id = _model_id.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


def _utc_timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class VoxJsonFormatter(JsonFormatter):
    """One JSON object per line: timestamp, level, service, logger, message, ids, extras."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["timestamp"] = _utc_timestamp(record)
        log_data["level"] = record.levelname
        log_data["service"] = getattr(record, "service", None)
        log_data["logger"] = record.name
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is None:
                log_data.pop(field, None)
            else:
                log_data[field] = value


class ConsoleFormatter(logging.Formatter):
    """Readable one-line format for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ids = " ".join(
            f"{name}={getattr(record, name)}"
            for name in ("model_id", "job_id", "trace_id")
            if getattr(record, name, None)
        )
        line = f"{_utc_timestamp(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if ids:
            line += f" [{ids}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def json_formatter() -> logging.Formatter:
    return VoxJsonFormatter(
        "%(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        json_ensure_ascii=False,
    )


def configure_logging(
    service: str,
    *,
    level: str = "INFO",
    fmt: str = "json",
    stream: Any = None,
    files: LogFileSettings | None = None,
    redactor: Redactor | None = None,
) -> logging.Handler:
    """Replace root handlers with one that writes ``fmt`` ("json" or "console") to stream,
    plus ``<service>.log`` and ``<service>.error.log`` (JSON, rotated) when files has a
    directory. Every handler redacts secrets (``redactor`` knows the configured ones)."""
    redactor = redactor or Redactor()
    if fmt == "json":
        formatter = json_formatter()
    elif fmt == "console":
        formatter = ConsoleFormatter()
    else:
        raise ValueError(f"log format must be 'json' or 'console', not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(RedactingFormatter(formatter, redactor))
    handlers: list[logging.Handler] = [handler]
    if files is not None and files.directory is not None:
        for name, file_level in ((f"{service}.log", logging.NOTSET), (f"{service}.error.log", logging.ERROR)):
            file_handler = RotatingLogFile(files.directory / name, files, level=file_level)
            file_handler.setFormatter(RedactingFormatter(json_formatter(), redactor))
            handlers.append(file_handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for new_handler in handlers:
        new_handler.addFilter(ContextFilter(service))
        root.addHandler(new_handler)
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "urllib3", "filelock", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler
