"""OpenTelemetry spans for the store's work (queue wait, manifest, transfers, verify, import).

Each span is a child of the RPC span that caused the work: a pull runs on a queue worker,
so its job carries the trace context captured when it was queued (a joined pull is the
first caller's). Exception messages, tracebacks and URLs pass a redactor first, so a
configured hub token never reaches a span.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from model_service.errors import DownloadCancelled
from voxserve_common.redaction import Redactor

QUEUE_WAIT = "model_store.queue_wait"
RESOLVE_MANIFEST = "model_store.resolve_manifest"
FILE_TRANSFER = "model_store.file_transfer"
VERIFY = "model_store.verify"
IMPORT = "model_store.import"

tracer = trace.get_tracer("model_service")


class WorkSpans:
    """Starts the store's work spans; ``secrets`` (the hub token) are masked in whatever a
    span records of an exception."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._redactor = Redactor()
        for secret in secrets:
            if secret:
                self._redactor.add_secret(secret)

    def redact(self, text: str) -> str:
        return self._redactor.redact(text)

    @contextlib.contextmanager
    def span(
        self, name: str, attributes: Mapping[str, AttributeValue], parent: Context | None = None
    ) -> Iterator[Span]:
        """A current span under ``parent`` (the current context when None). An exception
        is recorded (redacted) and sets the status to ERROR; a stop (cancel, pause,
        shutdown) is an event, not an error."""
        with tracer.start_as_current_span(
            name, context=parent, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except DownloadCancelled as stop:
                span.add_event("stopped", {"reason": self.redact(str(stop))})
                raise
            except BaseException as error:
                self.record_error(span, error)
                raise

    def record_error(self, span: Span, error: BaseException) -> None:
        message = self.redact(str(error))
        stack = self.redact("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        span.record_exception(error, attributes={"exception.message": message, "exception.stacktrace": stack})
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {message}"))

    def queue_wait(self, parent: Context | None, enqueued_ns: int, attributes: Mapping[str, AttributeValue]) -> None:
        """The span of a job's wait in the queue, from its enqueue until now."""
        span = tracer.start_span(QUEUE_WAIT, context=parent, start_time=enqueued_ns, attributes=attributes)
        span.end(end_time=max(time.time_ns(), enqueued_ns))
