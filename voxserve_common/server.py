"""gRPC server bootstrap: interceptor (trace, metrics, logs, error table), health,
reflection, /metrics, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import trace

from voxserve.admin.v1 import admin_pb2_grpc
from voxserve_common.admin import SERVICE_NAME as ADMIN_SERVICE
from voxserve_common.admin import AdminServicer
from voxserve_common.auth import AUTH_FAILURE_REASONS, Authenticator
from voxserve_common.errors import InvalidArgument, ResourceExhausted, VoxserveError
from voxserve_common.grpc_errors import ERROR_CATEGORY_KEY, category_for_code, status_for, wire_category
from voxserve_common.log_levels import LogLevelControl
from voxserve_common.logs import log_context
from voxserve_common.metrics import (
    ErrorCountingHandler,
    MetricsEndpoint,
    RpcMetrics,
    runtime_metrics,
    start_metrics_endpoint,
)
from voxserve_common.tls import ServerTls, server_credentials
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


class _RpcScope:
    """Per-call bookkeeping: span, status code, duration, one log line at the end."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext[Any, Any], metrics: RpcMetrics | None) -> None:
        self.method = method
        self.context = context
        self.metrics = metrics
        self.code = grpc.StatusCode.OK
        self.detail = ""

    @contextlib.contextmanager
    def run(self) -> Iterator[None]:
        parent = context_from_metadata(self.context.invocation_metadata())
        # Read the peer now: grpc.aio's context.peer() on a cancelled call can crash.
        peer = self.context.peer()
        token = otel_context.attach(parent)
        started = time.perf_counter()
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
                        self.code = _code_from_int(code)
                    self.detail = self.context.details() or ""
                    raise
                except asyncio.CancelledError:
                    self.code = grpc.StatusCode.CANCELLED
                    self.detail = "client cancelled or disconnected"
                    raise
                finally:
                    span.set_attribute("rpc.grpc.status_code", self.code.value[0])
                    duration = time.perf_counter() - started
                    if self.metrics:
                        self.metrics.requests.labels(self.method, self.code.name).inc()
                        self.metrics.duration.labels(self.method).observe(duration)
                    level = logging.INFO if self.code in _QUIET_CODES else logging.WARNING
                    if self.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        level = logging.ERROR
                    logger.log(
                        level,
                        "rpc finished",
                        extra={
                            "rpc_method": self.method,
                            "grpc_code": self.code.name,
                            "duration_ms": round(duration * 1000, 3),
                            "peer": peer,
                            **({"detail": self.detail} if self.detail else {}),
                            **(
                                {"error_category": category_for_code(self.code)}
                                if self.code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED)
                                else {}
                            ),
                        },
                    )
        finally:
            otel_context.detach(token)

    async def abort_for(self, error: BaseException) -> None:
        self.code = status_for(error)
        self.detail = str(error) or type(error).__name__
        if not isinstance(error, VoxserveError):
            logger.exception("unexpected error in %s", self.method, exc_info=error)
            self.detail = f"internal error: {type(error).__name__}: {error}"
        # The error's category travels with the status, so a client can tell a service
        # that answered with an error from one it could not reach (same status code).
        await self.context.abort(
            self.code, self.detail, trailing_metadata=((ERROR_CATEGORY_KEY, wire_category(error)),)
        )


_QUIET_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
}


def _code_from_int(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


# Transport limits, set on purpose (docs/security.md): a client may not open unbounded
# streams on one connection or ping the server in a loop, idle connections are closed, and
# long-lived ones are recycled (streams resume by sequence after a reconnect).
MAX_CONCURRENT_STREAMS = 256
MAX_CONNECTION_IDLE_MS = 30 * 60 * 1000
MAX_CONNECTION_AGE_MS = 24 * 3600 * 1000
MAX_CONNECTION_AGE_GRACE_MS = 5 * 60 * 1000
MIN_PING_INTERVAL_MS = 10_000
# Long-lived event streams one client address may hold open at once (a leak in a client
# must not exhaust the server); more get RESOURCE_EXHAUSTED.
MAX_WATCH_STREAMS_PER_PEER = 1024  # bench/bench_watch.py runs 500 watchers from one host
WATCH_METHODS = frozenset(
    {"/voxserve.modelstore.v1.ModelStore/WatchModels", "/voxserve.inference.v1.Inference/WatchJob"}
)


def server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
        ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", MAX_CONNECTION_AGE_GRACE_MS),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class PeerStreamLimit:
    """Counts open watch streams per client address (the port left out)."""

    def __init__(self, limit: int = MAX_WATCH_STREAMS_PER_PEER) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    @staticmethod
    def address(peer: str) -> str:
        return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer

    @contextlib.contextmanager
    def hold(self, peer: str, method: str) -> Iterator[None]:
        """Runs on the event loop (no lock needed); ResourceExhausted beyond the limit."""
        address = self.address(peer)
        if self._open.get(address, 0) >= self.limit:
            raise ResourceExhausted(
                f"{address} already has {self.limit} watch streams open; close some before opening more "
                f"({method.rsplit('/', 1)[-1]} resumes with after_sequence)"
            )
        self._open[address] = self._open.get(address, 0) + 1
        try:
            yield
        finally:
            self._open[address] -= 1
            if not self._open[address]:
                del self._open[address]


@dataclass(frozen=True)
class _Undecodable:
    method: str
    reason: str


def _tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: the caller's bytes
            return _Undecodable(method, str(error) or type(error).__name__)

    return decode


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidArgument(
            f"the request to {request.method} is not a valid protobuf message ({request.reason}); "
            "check that the client's generated code comes from the service's .proto files"
        )
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: continues the caller's trace, checks the caller's token and
    role (when authentication is on), maps domain errors to statuses through the one table,
    counts and times the RPC, and logs one line per call."""

    def __init__(
        self,
        metrics: RpcMetrics | None,
        authenticator: Authenticator | None = None,
        watch_limit: PeerStreamLimit | None = None,
    ) -> None:
        self.metrics = metrics
        self.authenticator = authenticator
        self.watch_limit = watch_limit or PeerStreamLimit()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        metrics = self.metrics
        authenticator = self.authenticator

        def authorize(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if authenticator is not None:
                authenticator.authorize(method, context.invocation_metadata(), context.peer())

        # Bytes that are not a valid request message: INVALID_ARGUMENT from the handler,
        # instead of grpc's own UNKNOWN for an exception in its deserializer.
        deserializer = _tolerant(handler.request_deserializer, method)
        watch_limit = self.watch_limit

        def watch_slot(context: grpc.aio.ServicerContext[Any, Any]) -> contextlib.AbstractContextManager[None]:
            if method in WATCH_METHODS:
                return watch_limit.hold(context.peer(), method)
            return contextlib.nullcontext()

        checked = _checked_stream if handler.request_streaming else _checked

        if handler.unary_unary or handler.stream_unary:
            # typeshed types handlers as sync callables; on a grpc.aio server they are coroutines.
            inner: Any = handler.unary_unary or handler.stream_unary

            async def unary_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                scope = _RpcScope(method, context, metrics)
                with scope.run():
                    try:
                        authorize(context)
                        return await inner(checked(request), context)
                    except (grpc.aio.AbortError, asyncio.CancelledError):
                        raise
                    except Exception as error:  # noqa: BLE001 - the edge maps every error
                        await scope.abort_for(error)

            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(
                    cast(Any, unary_behavior), deserializer, handler.response_serializer
                )
            return grpc.stream_unary_rpc_method_handler(unary_behavior, deserializer, handler.response_serializer)

        inner_stream: Any = handler.unary_stream or handler.stream_stream

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            scope = _RpcScope(method, context, metrics)
            with scope.run():
                try:
                    authorize(context)
                    with watch_slot(context):
                        async for item in inner_stream(checked(request), context):
                            yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:  # noqa: BLE001
                    await scope.abort_for(error)

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                cast(Any, stream_behavior), deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(stream_behavior, deserializer, handler.response_serializer)


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer and /metrics endpoint."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: Sequence[str]
    metrics_endpoint: MetricsEndpoint | None = None
    on_stop: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)
    log_levels: LogLevelControl = field(default_factory=LogLevelControl)
    # Run (in a worker thread) on SIGHUP: re-read what can change without a restart.
    on_reload: list[Callable[[], None]] = field(default_factory=list)

    async def reload(self) -> None:
        """Run every reload hook; one that fails is logged and the others still run."""
        for hook in self.on_reload:
            try:
                await asyncio.to_thread(hook)
            except Exception:
                logger.exception("reload failed", extra={"hook": getattr(hook, "__qualname__", repr(hook))})

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set_serving(self, serving: bool) -> None:
        """Liveness and readiness together (the overall "" status and every service name)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def set_ready(self, ready: bool) -> None:
        """Readiness: the service names' status. NOT_SERVING until the start-up work that
        requests depend on is done and while draining; "" (liveness) stays SERVING while
        the process is alive, so an orchestrator does not restart a server that is busy
        starting or stopping."""
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in self.service_names:
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting RPCs, run shutdown hooks (which end long streams), then wait
        up to ``grace`` seconds for in-flight calls before cancelling them."""
        await self.set_ready(False)  # draining: not ready for new work, still alive
        for hook in self.on_stop:
            result = hook()
            if asyncio.iscoroutine(result):
                await result
        await self.server.stop(grace)
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()


async def start_server(
    *,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    host: str,
    port: int,
    rpc_metrics: RpcMetrics | None,
    metrics_registry: Any = None,
    metrics_port: int | None = None,
    max_message_bytes: int = 64 * 1024 * 1024,
    disk_paths: Mapping[str, Path] | None = None,
    log_levels: LogLevelControl | None = None,
    service_label: str = "",
    tls: ServerTls | None = None,
    authenticator: Authenticator | None = None,
    max_watch_streams_per_peer: int = MAX_WATCH_STREAMS_PER_PEER,
    ready: bool = True,
) -> RunningServer:
    """Build, bind and start an aio server with health and reflection; returns
    RunningServer whose ``port`` is the bound one (pass port 0 in tests).

    Liveness ("" in grpc.health.v1) is SERVING from here on; readiness (the service names)
    is ``ready``: pass False when start-up work must finish first, then ``set_ready(True)``.
    """
    options = [*server_options(max_message_bytes)]
    runtime = runtime_metrics(metrics_registry, disk_paths) if metrics_registry is not None else None
    if authenticator is not None and runtime is not None:
        failures, label = runtime.auth_failures, service_label or (service_names[0] if service_names else "")
        for reason in AUTH_FAILURE_REASONS:
            failures.labels(label, reason)
        authenticator.on_failure = lambda reason: failures.labels(label, reason).inc()
    server = grpc.aio.server(
        interceptors=[
            ObservabilityInterceptor(rpc_metrics, authenticator, PeerStreamLimit(max_watch_streams_per_peer))
        ],
        options=options,
    )
    register(server)
    log_levels = log_levels or LogLevelControl()
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(log_levels), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            *service_names,
            ADMIN_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    if tls is not None:
        credentials, _ = server_credentials(tls)
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind gRPC port {host}:{port}")
    await server.start()
    endpoint = None
    if metrics_registry is not None and metrics_port is not None and metrics_port >= 0:
        endpoint = start_metrics_endpoint(metrics_registry, host, metrics_port, tls)
    running = RunningServer(server, bound, health_servicer, service_names, endpoint)
    if runtime is not None:
        lag_watch = asyncio.create_task(runtime.watch_event_loop(), name="event-loop-lag")

        def stop_lag_watch() -> None:
            lag_watch.cancel()

        running.on_stop.append(stop_lag_watch)
        error_counter = ErrorCountingHandler(
            runtime.errors, service_label or (service_names[0] if service_names else "")
        )
        logging.getLogger().addHandler(error_counter)

        def stop_error_counter() -> None:
            logging.getLogger().removeHandler(error_counter)

        running.on_stop.append(stop_error_counter)
    running.on_stop.append(log_levels.close)
    if authenticator is not None:
        running.on_reload.append(authenticator.reload)
    running.log_levels = log_levels
    await running.health.set("", health_pb2.HealthCheckResponse.SERVING)
    await running.set_ready(ready)
    logger.info(
        "server started",
        extra={
            "grpc_port": bound,
            "metrics_port": endpoint.port if endpoint else None,
            "services": list(service_names),
        },
    )
    return running


async def serve_until_signal(running: RunningServer, grace_seconds: float) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully; SIGHUP runs the reload hooks."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    def reload() -> None:
        logger.info("SIGHUP: reloading")
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    logger.info("shutdown requested", extra={"grace_seconds": grace_seconds})
    await running.stop(grace_seconds)
    logger.info("server stopped")
