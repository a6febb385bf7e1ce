"""Prometheus plumbing both services share: a per-server registry and the RPC metrics.

Each server owns a CollectorRegistry (not the process-global one) so tests can run many
servers in one process and every /metrics page shows only its own service.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

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


def start_metrics_endpoint(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Serve ``registry`` on http://host:port/metrics in a daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server=server, thread=thread, port=server.server_port)
