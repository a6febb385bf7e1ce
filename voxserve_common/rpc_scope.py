"""One RPC's bookkeeping in the interceptor: its span (continuing the caller's trace), its
metrics, its one "rpc finished" log line, and the abort that maps a domain error to a status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from voxserve_common.errors import VoxserveError
from voxserve_common.grpc_errors import ERROR_CATEGORY_KEY, category_for_code, status_for, wire_category
from voxserve_common.logs import log_context
from voxserve_common.metrics import RpcMetrics
from voxserve_common.tracing import context_from_metadata

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voxserve.rpc")


class _CancelledStreamDetachFilter(logging.Filter):
    """grpc.aio may finalize a cancelled stream's generator in another context, where
    OpenTelemetry cannot reset the token it attached and logs a traceback; the context
    dies with the call anyway, so that one message is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Failed to detach context"


logging.getLogger("opentelemetry.context").addFilter(_CancelledStreamDetachFilter())


class RpcScope:
    """Per-call bookkeeping: span, status code, duration, one log line at the end."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any], metrics: RpcMetrics | None) -> None:
        self.method = method
        self.context = context
        self.metrics = metrics
        self.code = grpc.StatusCode.OK
        self.detail = ""
        self._finished = False
        self._started = time.perf_counter()
        self._peer = ""

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        parent = context_from_metadata(self.context.invocation_metadata())
        # Read the peer now: grpc.aio's context.peer() on a cancelled call can crash.
        peer = self.context.peer()
        self._peer = peer
        token = otel_context.attach(parent)
        self._started = time.perf_counter()
        if self.metrics:
            self.metrics.in_flight.labels(self.method).inc()
        try:
            service, _, method = self.method.lstrip("/").partition("/")
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
            with (
                tracer.start_as_current_span(self.method, kind=trace.SpanKind.SERVER, attributes=attributes) as span,
                log_context(method=self.method, peer=peer),
            ):
                try:
                    yield
                except grpc.aio.AbortError:
                    code = self.context.code()
                    if isinstance(code, grpc.StatusCode):
                        self.code = code
                    elif isinstance(code, int):
                        self.code = code_from_int(code)
                    self.detail = self.context.details() or ""
                    raise
                except asyncio.CancelledError:
                    self.code = grpc.StatusCode.CANCELLED
                    self.detail = "client cancelled or disconnected"
                    raise
                finally:
                    self._finish(span)
        finally:
            otel_context.detach(token)

    def _finish(self, span: trace.Span | None = None) -> None:
        """Count the call, log its one line and mark its span: once, before the status leaves
        (grpc.aio's abort sends the status at once, so a caller that saw an error and then
        scraped /metrics or read the log must find the call there)."""
        if self._finished:
            return
        self._finished = True
        span = span or trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", self.code.value[0])
        duration = time.perf_counter() - self._started
        if self.metrics:
            self.metrics.requests.labels(self.method, self.code.name).inc()
            self.metrics.duration.labels(self.method).observe(duration)
        level = logging.INFO if self.code in QUIET_CODES else logging.WARNING
        if self.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            level = logging.ERROR
        logger.log(
            level,
            "rpc finished",
            extra={
                "rpc_method": self.method,
                "grpc_code": self.code.name,
                "duration_ms": round(duration * 1000, 3),
                "peer": self._peer,
                **({"detail": self.detail} if self.detail else {}),
                **(
                    {"error_category": category_for_code(self.code)}
                    if self.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
                    else {}
                ),
            },
        )

    async def abort_for(self, error: BaseException) -> None:
        self.code = status_for(error)
        self.detail = str(error) or type(error).__name__
        if not isinstance(error, VoxserveError):
            logger.exception("unexpected error in %s", self.method, exc_info=error)
            self.detail = f"internal error: {type(error).__name__}: {error}"
        # The error's category travels with the status, so a client can tell a service
        # that answered with an error from one it could not reach (same status code).
        self._finish()
        await self.context.abort(
            self.code, self.detail, trailing_metadata=((ERROR_CATEGORY_KEY, wire_category(error)),)
        )


QUIET_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


def code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
