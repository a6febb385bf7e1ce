"""The gateway's Prometheus registry and the ASGI middleware that traces, times, counts
and logs every HTTP request.

Labels use the route template (``/api/models/{id}``), never the raw path: a path holds
whatever a client typed, and each distinct label value is a new series.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxserve_common.logs import log_context
from voxserve_common.metrics import RPC_LATENCY_BUCKETS
from voxserve_common.tracing import context_from_metadata

logger = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

UNMATCHED_ROUTE = "unmatched"  # any path no route serves (the 404s), as one series


class GatewayMetrics:
    """The gateway's own metrics, on a registry of its own (served on --metrics-port)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "voxserve_http_requests",
            "HTTP requests answered, by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "voxserve_http_request_duration_seconds",
            "Time from request to the end of the response body (whole stream for streaming routes).",
            ["route"],
            buckets=RPC_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.event_streams = Gauge(
            "voxserve_http_event_streams",
            "Open server-sent event streams (/api/events, /api/jobs/{id}/events).",
            registry=self.registry,
        )
        self.realtime_sessions = Gauge(
            "voxserve_http_realtime_sessions",
            "Open OpenAI Realtime transcription sessions (/v1/realtime WebSockets).",
            registry=self.registry,
        )
        self.realtime_sessions_ended = Counter(
            "voxserve_http_realtime_sessions_ended",
            "Realtime sessions that ended, by outcome (client_closed, idle, refused, client_not_reading).",
            ["outcome"],
            registry=self.registry,
        )


def route_template(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The template of the route that served ``scope``; for an answer given before
    routing (a 413 from the body limit), the route the path would have gone to."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", None) or UNMATCHED_ROUTE)
    return UNMATCHED_ROUTE


class ObservabilityMiddleware:
    """Continues the caller's ``traceparent`` in a server span (the gRPC calls made while
    handling the request continue it again), counts and times the request by route and
    status, and logs one line when the response has ended."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", ())]
        parent = context_from_metadata(headers)
        client = scope.get("client")
        peer = f"{client[0]}:{client[1]}" if client else None
        status = {"code": 500}

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        started = time.perf_counter()
        method = str(scope.get("method", ""))
        with (
            tracer.start_as_current_span(f"HTTP {method}", context=parent, kind=SpanKind.SERVER) as span,
            log_context(peer=peer),
        ):
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", str(scope.get("path", "")))
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                elapsed = time.perf_counter() - started
                route = route_template(scope, self.routes)
                code = status["code"]
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", code)
                if code >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.metrics.requests.labels(route, str(code)).inc()
                self.metrics.duration.labels(route).observe(elapsed)
                extra: dict[str, Any] = {
                    "http_method": method,
                    "route": route,
                    "path": scope.get("path"),
                    "status": code,
                    "duration_seconds": round(elapsed, 6),
                }
                logger.log(logging.ERROR if code >= 500 else logging.INFO, "http request finished", extra=extra)
