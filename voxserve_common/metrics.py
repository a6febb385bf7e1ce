"""Prometheus plumbing both services share: a per-server registry and the RPC metrics.

Each server owns a CollectorRegistry (not the process-global one) so tests can run many
servers in one process and every /metrics page shows only its own service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import ssl
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psutil
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from voxserve_common.errors import CATEGORIES
from voxserve_common.logs import error_category
from voxserve_common.tls import ServerTls

logger = logging.getLogger(__name__)

RPC_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class RpcMetrics:
    """RPC counters and latency, labelled by full method name and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "voxserve_rpc_requests",
            "gRPC requests handled, by method and final status code.",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "voxserve_rpc_duration_seconds",
            "Time from request to final status (whole stream for streaming RPCs).",
            ["method"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Counter(
            "voxserve_rpc_started",
            "gRPC requests started, by method (started - requests = in flight).",
            ["method"],
            registry=registry,
        )


@dataclass
class MetricsEndpoint:
    """A running /metrics HTTP server; ``port`` is the bound port (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# A client gets this long to finish its TLS handshake and send its request.
METRICS_CLIENT_TIMEOUT_SECONDS = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_CLIENT_TIMEOUT_SECONDS  # StreamRequestHandler applies it to the connection

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (the RPC metrics say what matters)."""


class _TlsMetricsServer(ThreadingWSGIServer):
    """HTTPS for /metrics with each connection's TLS handshake in that connection's own thread.

    prometheus_client wraps the listening socket, so the handshake runs inside accept() on the
    one serving thread: a single client that connects and sends nothing (a port scan, a TCP
    probe) stalls every scrape and the endpoint's shutdown. Here accept() only accepts.
    """

    tls_context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = self.socket.accept()
        connection.settimeout(METRICS_CLIENT_TIMEOUT_SECONDS)
        wrapped = self.tls_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError) as error:  # a client without a valid certificate, or a silent one
            logger.debug("metrics client refused", extra={"peer": str(client_address[0]), "error": str(error)})
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("metrics request failed", exc_info=True)


def metrics_tls_context(tls: ServerTls) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.client_ca is not None:
        context.load_verify_locations(str(tls.client_ca))
    if tls.mutual:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def start_metrics_endpoint(
    registry: CollectorRegistry, host: str, port: int, tls: ServerTls | None = None
) -> MetricsEndpoint:
    """Serve ``registry`` on http(s)://host:port/metrics in a daemon thread; with ``tls``
    over HTTPS with the server's certificate (and client certificates with its client CA)."""
    if tls is None:
        server, thread = start_http_server(port, addr=host, registry=registry)
        return MetricsEndpoint(server=server, thread=thread, port=server.server_port)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    context = metrics_tls_context(tls)

    class Server(_TlsMetricsServer):
        address_family = family
        tls_context = context

    httpd: WSGIServer = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-https", daemon=True)
    thread.start()
    return MetricsEndpoint(server=httpd, thread=thread, port=httpd.server_port)


def runtime_metrics(registry: CollectorRegistry, disk_paths: Mapping[str, Path] | None = None) -> RuntimeMetrics:
    """The registry's RuntimeMetrics, registered on first use (a registry takes them once)."""
    existing = getattr(registry, "_voxserve_runtime", None)
    if isinstance(existing, RuntimeMetrics):
        return existing
    runtime = RuntimeMetrics(registry, disk_paths)
    registry._voxserve_runtime = runtime  # type: ignore[attr-defined]
    return runtime


class RuntimeMetrics:
    """Process, host and device figures every service exports beside its own metrics.

    CPU seconds, RSS, open fds and threads come from prometheus_client's process and
    platform collectors; available memory and free disk are what the model cache and the
    store decide on; GPU memory and utilisation appear only where CUDA is present.
    """

    def __init__(self, registry: CollectorRegistry, disk_paths: Mapping[str, Path] | None = None) -> None:
        self.auth_failures = Counter(
            "voxserve_auth_failures",
            "Calls refused by authentication, by service and reason (missing, malformed, invalid, forbidden).",
            ["service", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            "voxserve_errors",
            "Log records about an error (failed RPCs, exceptions, ERROR and above), by service and error category.",
            ["service", "category"],
            registry=registry,
        )
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        registry.register(_HostCollector(dict(disk_paths or {})))
        self.event_loop_lag = Gauge(
            "voxserve_event_loop_lag_seconds",
            "How late the event loop ran a timer at the last check (time callbacks wait for the loop).",
            registry=registry,
        )
        self.event_loop_lag_samples = Histogram(
            "voxserve_event_loop_lag_observed_seconds",
            "Event-loop lag samples, one per check interval.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )

    async def watch_event_loop(self, interval: float = 0.5) -> None:
        """Sample the running loop's lag until cancelled (a task of the server)."""
        loop = asyncio.get_running_loop()
        while True:
            scheduled = loop.time() + interval
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - scheduled)
            self.event_loop_lag.set(lag)
            self.event_loop_lag_samples.observe(lag)


class _HostCollector(Collector):
    """Reads host memory, free disk and (with CUDA) GPU figures at every scrape."""

    def __init__(self, disk_paths: dict[str, Path]) -> None:
        self.disk_paths = disk_paths

    def collect(self) -> Iterable[Metric]:
        memory = psutil.virtual_memory()
        yield GaugeMetricFamily("voxserve_host_memory_total_bytes", "Memory of the host.", value=memory.total)
        yield GaugeMetricFamily(
            "voxserve_host_memory_available_bytes",
            "Memory available to new allocations without swapping (psutil's 'available').",
            value=memory.available,
        )
        disk = GaugeMetricFamily(
            "voxserve_host_disk_free_bytes",
            "Free bytes on the file system of a directory the service uses.",
            labels=["dir"],
        )
        for name, path in self.disk_paths.items():
            with contextlib.suppress(OSError):
                disk.add_metric([name], shutil.disk_usage(path).free)
        yield disk
        yield from _gpu_families()


def _gpu_families() -> Iterable[Metric]:
    torch = sys.modules.get("torch")  # only a process that already uses torch reports its GPUs
    if torch is None or not torch.cuda.is_available():
        return
    used = GaugeMetricFamily(
        "voxserve_gpu_memory_used_bytes", "Memory in use on a GPU (all processes).", labels=["device"]
    )
    total = GaugeMetricFamily("voxserve_gpu_memory_total_bytes", "Memory of a GPU.", labels=["device"])
    utilisation = GaugeMetricFamily(
        "voxserve_gpu_utilization_ratio", "Share of time a GPU was busy (NVML), 0-1.", labels=["device"]
    )
    for index in range(torch.cuda.device_count()):
        free, size = torch.cuda.mem_get_info(index)
        device = f"cuda:{index}"
        used.add_metric([device], size - free)
        total.add_metric([device], size)
        with contextlib.suppress(Exception):  # NVML (pynvml) is optional
            utilisation.add_metric([device], torch.cuda.utilization(index) / 100.0)
    yield used
    yield total
    yield utilisation


class ErrorCountingHandler(logging.Handler):
    """Counts every log record about an error into voxserve_errors_total (on the caller's
    thread: a counter increment, nothing else)."""

    def __init__(self, counter: Counter, service: str) -> None:
        super().__init__(level=logging.INFO)
        self.counter = counter
        self.service = service
        for category in CATEGORIES:  # dashboards and rate() see every category from the start
            counter.labels(service, category.__name__)

    def emit(self, record: logging.LogRecord) -> None:
        category = error_category(record)
        if category is not None:
            self.counter.labels(getattr(record, "service", None) or self.service, category).inc()
