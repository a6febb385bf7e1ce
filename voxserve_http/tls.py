"""HTTPS on the gateway's port with certificate rotation, as the gRPC servers have it.

uvicorn builds one SSLContext at start-up. The context's SNI callback, which OpenSSL runs
at every TLS handshake (with or without a server name), checks the files' modification
times at most once a second; after a change it builds a new context from them and hands it
to this and later connections. Established connections keep their session; a file that
cannot be read keeps the previous certificate in service and logs an error.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable

from voxserve_common.tls import ServerTls

logger = logging.getLogger(__name__)

ContextFactory = Callable[[], ssl.SSLContext]


class RotatingContext:
    """The SNI callback of the listening context: switches each new connection to the
    context built from the files as they are now."""

    def __init__(self, tls: ServerTls, build: ContextFactory, check_interval: float = 1.0) -> None:
        self.tls = tls
        self.build = build
        self.check_interval = check_interval
        self.current = build()
        self.current.sni_callback = self
        self.reloads = 0
        self._stamps = self._mtimes()
        self._checked = time.monotonic()

    def _mtimes(self) -> tuple[int, ...]:
        stamps = []
        for path in self.tls.files():
            try:
                stamps.append(os.stat(path).st_mtime_ns)
            except OSError:
                stamps.append(-1)
        return tuple(stamps)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_interval:
            return
        self._checked = now
        stamps = self._mtimes()
        if stamps == self._stamps:
            return
        try:
            context = self.build()
        except (OSError, ssl.SSLError, ValueError) as error:
            logger.error("TLS files changed but cannot be read; serving the previous ones", extra={"error": str(error)})
            return
        self._stamps = stamps
        self.current = context
        self.reloads += 1
        logger.info("TLS certificate reloaded", extra={"cert": str(self.tls.cert)})

    def __call__(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        self._maybe_reload()
        if connection.context is not self.current:
            connection.context = self.current


def ssl_context_factory(
    tls: ServerTls, holder: list[RotatingContext]
) -> Callable[[object, ContextFactory], ssl.SSLContext]:
    """uvicorn's ``ssl_context_factory``: its own context (uvicorn's options, from the
    ssl_* settings), rebuilt from the files whenever they change; ``holder`` receives the
    rotation (for tests and logs)."""

    def factory(config: object, default: ContextFactory) -> ssl.SSLContext:
        rotation = RotatingContext(tls, default)
        holder.append(rotation)
        return rotation.current

    return factory
