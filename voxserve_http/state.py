"""What every route reaches: settings, backends, metrics and the shutdown flag."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from voxserve_http.clients import Backends
from voxserve_http.config import GatewayConfig
from voxserve_http.errors import ApiError
from voxserve_http.metrics import GatewayMetrics


@dataclass
class Gateway:
    config: GatewayConfig
    backends: Backends
    metrics: GatewayMetrics
    # Set when shutdown begins: /readyz answers 503 and event streams end, so the
    # server's graceful wait is spent on transcriptions, not on endless streams.
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    open_streams: int = 0
    realtime_sessions: int = 0  # open /v1/realtime WebSockets

    def acquire_stream(self) -> None:
        """Count one event stream in; 429 past max_event_streams."""
        if self.open_streams >= self.config.max_event_streams:
            raise ApiError(
                429,
                f"{self.open_streams} event streams are open, the gateway's limit (max_event_streams); "
                "close one or retry later",
                type="rate_limit_error",
                code="too_many_streams",
                headers={"Retry-After": str(self.config.retry_after_seconds)},
            )
        self.open_streams += 1
        self.metrics.event_streams.inc()

    def release_stream(self) -> None:
        self.open_streams -= 1
        self.metrics.event_streams.dec()


def gateway(request: HTTPConnection) -> Gateway:
    """FastAPI dependency: the gateway of the running app."""
    found: Gateway = request.app.state.gateway
    return found


def authorization(request: HTTPConnection, header: str | None = None) -> str | None:
    """The caller's Authorization header (or ``header``: the same credentials sent another
    way), forwarded as gRPC metadata (checked by the services); without one, the gateway's
    backend token (backend_token_file) if it has one."""
    header = request.headers.get("authorization") or header
    if header is not None:
        return header
    token = gateway(request).backends.backend_token
    return f"Bearer {token}" if token else None
