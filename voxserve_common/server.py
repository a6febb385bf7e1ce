"""gRPC server bootstrap: the one interceptor (trace, auth, metrics, logs, error table),
health, reflection, the Admin service, /metrics, and graceful shutdown on SIGTERM/SIGINT.

``start_server`` runs in phases, the way uvicorn's ``Server.startup`` does: build the aio
server (interceptor, options, services), bind, start, install the hooks that run on stop
and reload, then announce liveness and readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voxserve.admin.v1 import admin_pb2_grpc
from voxserve_common.admin import SERVICE_NAME as ADMIN_SERVICE
from voxserve_common.admin import AdminServicer
from voxserve_common.auth import AUTH_FAILURE_REASONS, Authenticator
from voxserve_common.errors import ResourceExhausted
from voxserve_common.log_levels import LogLevelControl
from voxserve_common.metrics import (
    ErrorCountingHandler,
    MetricsEndpoint,
    RpcMetrics,
    RuntimeMetrics,
    runtime_metrics,
    start_metrics_endpoint,
)
from voxserve_common.rpc_requests import checked, checked_stream, log_request, tolerant
from voxserve_common.rpc_scope import RpcScope
from voxserve_common.tls import ServerTls, server_credentials

logger = logging.getLogger(__name__)


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


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler: continues the caller's trace, checks the caller's token and
    role (when authentication is on), maps domain errors to statuses through the one table,
    counts and times the RPC, logs one line per call and, at DEBUG, the request's fields
    (``rpc_requests.log_request``: strings escaped and cut, bytes as their length)."""

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
        # Bytes that are not a valid request message: INVALID_ARGUMENT from the handler,
        # instead of grpc's own UNKNOWN for an exception in its deserializer.
        deserializer = tolerant(handler.request_deserializer, method)
        serializer = handler.response_serializer
        # typeshed types handlers as sync callables; on a grpc.aio server they are coroutines.
        if handler.unary_unary:
            unary = self._unary(method, handler.unary_unary, streaming=False)
            return grpc.unary_unary_rpc_method_handler(cast(Any, unary), deserializer, serializer)
        if handler.stream_unary:
            unary = self._unary(method, handler.stream_unary, streaming=True)
            return grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)
        if handler.unary_stream:
            stream = self._stream(method, handler.unary_stream, streaming=False)
            return grpc.unary_stream_rpc_method_handler(cast(Any, stream), deserializer, serializer)
        stream = self._stream(method, handler.stream_stream, streaming=True)
        return grpc.stream_stream_rpc_method_handler(stream, deserializer, serializer)

    def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any], request: Any, streaming: bool) -> Any:
        """Authorize the call, then the request (checked; logged at DEBUG) for the handler."""
        if self.authenticator is not None:
            self.authenticator.authorize(method, context.invocation_metadata(), context.peer())
        if streaming:
            return checked_stream(request)
        request = checked(request)
        log_request(request)
        return request

    def _watch_slot(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> contextlib.AbstractContextManager[None]:
        if method in WATCH_METHODS:
            return self.watch_limit.hold(context.peer(), method)
        return contextlib.nullcontext()

    def _unary(self, method: str, inner: Any, streaming: bool) -> Callable[..., Awaitable[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            scope = RpcScope(method, context, self.metrics)
            with scope.run():
                try:
                    return await inner(self._admit(method, context, request, streaming), context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:  # noqa: BLE001 - the edge maps every error
                    await scope.abort_for(error)

        return behavior

    def _stream(self, method: str, inner: Any, streaming: bool) -> Callable[..., AsyncIterator[Any]]:
        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            scope = RpcScope(method, context, self.metrics)
            with scope.run():
                try:
                    admitted = self._admit(method, context, request, streaming)
                    with self._watch_slot(method, context):
                        async for item in inner(admitted, context):
                            yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as error:  # noqa: BLE001
                    await scope.abort_for(error)

        return behavior


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


@dataclass(frozen=True)
class ServerConfig:
    """What ``start_server`` builds, as one typed value (its keyword arguments)."""

    register: Callable[[grpc.aio.Server], None]
    service_names: Sequence[str]
    host: str
    port: int
    rpc_metrics: RpcMetrics | None
    metrics_registry: Any = None
    metrics_port: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    disk_paths: Mapping[str, Path] | None = None
    log_levels: LogLevelControl | None = None
    service_label: str = ""
    tls: ServerTls | None = None
    authenticator: Authenticator | None = None
    max_watch_streams_per_peer: int = MAX_WATCH_STREAMS_PER_PEER
    ready: bool = True

    @property
    def label(self) -> str:
        """The ``service`` label of the auth-failure and error counters."""
        return self.service_label or (self.service_names[0] if self.service_names else "")


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
    The arguments are ServerConfig's fields; ``start(config)`` takes one.
    """
    return await start(
        ServerConfig(
            register=register, service_names=service_names, host=host, port=port, rpc_metrics=rpc_metrics,
            metrics_registry=metrics_registry, metrics_port=metrics_port, max_message_bytes=max_message_bytes,
            disk_paths=disk_paths, log_levels=log_levels, service_label=service_label, tls=tls,
            authenticator=authenticator, max_watch_streams_per_peer=max_watch_streams_per_peer, ready=ready,
        )
    )  # fmt: skip


async def start(config: ServerConfig) -> RunningServer:
    """The start-up phases in order; see the module docstring."""
    runtime = _runtime_metrics(config)
    log_levels = config.log_levels or LogLevelControl()
    server = _build(config)
    health_servicer = _add_standard_services(server, config.service_names, log_levels)
    port = _bind(server, config)
    await server.start()
    endpoint = None
    if config.metrics_registry is not None and config.metrics_port is not None and config.metrics_port >= 0:
        endpoint = start_metrics_endpoint(config.metrics_registry, config.host, config.metrics_port, config.tls)
    running = RunningServer(server, port, health_servicer, config.service_names, endpoint, log_levels=log_levels)
    _install_hooks(running, config, runtime)
    await _announce(running, config.ready)
    return running


def _runtime_metrics(config: ServerConfig) -> RuntimeMetrics | None:
    """The process/host figures of the registry, and the auth-failure counter wired up."""
    if config.metrics_registry is None:
        return None
    runtime = runtime_metrics(config.metrics_registry, config.disk_paths)
    if config.authenticator is not None:
        failures, label = runtime.auth_failures, config.label
        for reason in AUTH_FAILURE_REASONS:
            failures.labels(label, reason)
        config.authenticator.on_failure = lambda reason: failures.labels(label, reason).inc()
    return runtime


def _build(config: ServerConfig) -> grpc.aio.Server:
    """The aio server with the interceptor, the transport limits and the caller's services."""
    interceptor = ObservabilityInterceptor(
        config.rpc_metrics, config.authenticator, PeerStreamLimit(config.max_watch_streams_per_peer)
    )
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(config.max_message_bytes))
    config.register(server)
    return server


def _add_standard_services(
    server: grpc.aio.Server, service_names: Sequence[str], log_levels: LogLevelControl
) -> health.aio.HealthServicer:
    """Admin (log levels), health and reflection beside the service's own."""
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(log_levels), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*service_names, ADMIN_SERVICE, health_name, reflection.SERVICE_NAME), server)
    return health_servicer


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    """The bound port (TLS when configured); OSError when the address cannot be bound."""
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        credentials, _ = server_credentials(config.tls)
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC port {address}")
    return bound


def _install_hooks(running: RunningServer, config: ServerConfig, runtime: RuntimeMetrics | None) -> None:
    """What runs on stop (event-loop lag watch, error counter, timed log levels) and on SIGHUP."""
    if runtime is not None:
        lag_watch = asyncio.create_task(runtime.watch_event_loop(), name="event-loop-lag")
        error_counter = ErrorCountingHandler(runtime.errors, config.label)
        logging.getLogger().addHandler(error_counter)

        def stop_lag_watch() -> None:
            lag_watch.cancel()

        def stop_error_counter() -> None:
            logging.getLogger().removeHandler(error_counter)

        running.on_stop.extend((stop_lag_watch, stop_error_counter))
    running.on_stop.append(running.log_levels.close)
    if config.authenticator is not None:
        running.on_reload.append(config.authenticator.reload)


async def _announce(running: RunningServer, ready: bool) -> None:
    """Liveness SERVING, readiness as asked, and the "server started" record."""
    await running.health.set("", health_pb2.HealthCheckResponse.SERVING)
    await running.set_ready(ready)
    endpoint = running.metrics_endpoint
    logger.info(
        "server started",
        extra={
            "grpc_port": running.port,
            "metrics_port": endpoint.port if endpoint else None,
            "services": list(running.service_names),
        },
    )


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
