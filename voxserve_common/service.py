"""The entry-point life cycle both services share: logging, tracing, serve, clean up."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from voxserve_common.errors import VoxserveError
from voxserve_common.logs import configure_logging
from voxserve_common.server import RunningServer, serve_until_signal
from voxserve_common.tracing import setup_tracing

logger = logging.getLogger(__name__)


class ServiceConfig(Protocol):
    @property
    def log_level(self) -> str: ...
    @property
    def log_format(self) -> str: ...
    @property
    def grace_seconds(self) -> float: ...


class ServiceApp(Protocol):
    @property
    def server(self) -> RunningServer: ...


C = TypeVar("C", bound=ServiceConfig)
A = TypeVar("A", bound=ServiceApp)


def run_service(
    *,
    service: str,
    program: str,
    config: C,
    start: Callable[[C], Awaitable[A]],
    close: Callable[[A], Any],
) -> None:
    """Configure logs and tracing, start the app, serve until SIGTERM/SIGINT, then close
    the domain objects; a start-up failure exits 1 with the reason on stderr."""
    configure_logging(service, level=config.log_level, fmt=config.log_format)
    setup_tracing(service)

    async def serve() -> None:
        app = await start(config)
        try:
            await serve_until_signal(app.server, config.grace_seconds)
        finally:
            await asyncio.to_thread(close, app)

    try:
        asyncio.run(serve())
    except (VoxserveError, OSError) as error:
        logger.error("service failed", extra={"error": str(error)})
        print(f"{program}: {error}", file=sys.stderr)
        raise SystemExit(1) from None
