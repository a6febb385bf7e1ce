"""TLS and mutual TLS for both servers and every client, with certificate rotation.

Servers re-read their certificate, key and client CA when one of the files changes (the
check runs at each new TLS handshake, at most once a second), so a rotated certificate is
served without a restart. Clients build channels with the same CA/cert/key triple and send
a bearer token as ``authorization`` metadata.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

logger = logging.getLogger(__name__)


class TlsConfigError(ValueError):
    """A certificate, key or CA file is missing or unreadable (a start-up configuration error)."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TlsConfigError(f"cannot read the {what} {path}: {error.strerror or error}") from None
    if not data.strip():
        raise TlsConfigError(f"the {what} {path} is empty")
    return data


@dataclass(frozen=True)
class ServerTls:
    """``cert`` and ``key`` serve TLS; ``client_ca`` also requires client certificates it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def files(self) -> tuple[Path, ...]:
        return (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(cert chain, key, client CA) as they are on disk now; TlsConfigError if unreadable."""
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        ca = _read(self.client_ca, "client CA") if self.client_ca else None
        return cert, key, ca


def server_tls(cert: str | Path | None, key: str | Path | None, client_ca: str | Path | None) -> ServerTls | None:
    """ServerTls from settings (None when TLS is off); TlsConfigError for half a pair."""
    if not cert and not key:
        if client_ca:
            raise TlsConfigError("tls_client_ca needs tls_cert and tls_key: mutual TLS runs over TLS")
        return None
    if not cert or not key:
        raise TlsConfigError("tls_cert and tls_key go together: give both or neither")
    tls = ServerTls(Path(cert), Path(key), Path(client_ca) if client_ca else None)
    tls.read()  # fail at start-up, not at the first handshake
    return tls


class _RotatingCertificates:
    """The certificate fetcher grpc calls before each handshake: a new configuration when
    the files changed, None to keep the current one."""

    def __init__(self, tls: ServerTls) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._stamps = self._mtimes()
        self._checked = time.monotonic()
        self.reloads = 0

    def _mtimes(self) -> tuple[int, ...]:
        stamps = []
        for path in self.tls.files():
            try:
                stamps.append(os.stat(path).st_mtime_ns)
            except OSError:
                stamps.append(-1)
        return tuple(stamps)

    def configuration(self) -> Any:
        cert, key, ca = self.tls.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> Any:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < 1.0:
                return None
            self._checked = now
            stamps = self._mtimes()
            if stamps == self._stamps:
                return None
            try:
                configuration = self.configuration()
            except (TlsConfigError, ValueError) as error:
                logger.error(
                    "TLS files changed but cannot be read; serving the previous ones", extra={"error": str(error)}
                )
                return None
            self._stamps = stamps
            self.reloads += 1
        logger.info("TLS certificate reloaded", extra={"cert": str(self.tls.cert)})
        return configuration


def server_credentials(tls: ServerTls) -> tuple[grpc.ServerCredentials, _RotatingCertificates]:
    """Credentials that follow the files on disk, and the fetcher (for tests and logs)."""
    fetcher = _RotatingCertificates(tls)
    credentials = grpc.dynamic_ssl_server_credentials(
        fetcher.configuration(), fetcher, require_client_authentication=tls.mutual
    )
    return credentials, fetcher


@dataclass(frozen=True)
class ClientTls:
    """A client's trust (``ca``; None = the system's roots) and optional certificate for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise TlsConfigError("a client certificate and its key go together: give both or neither")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA file") if self.ca else None,
            private_key=_read(self.key, "client key") if self.key else None,
            certificate_chain=_read(self.cert, "client certificate") if self.cert else None,
        )


def client_tls(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> ClientTls | None:
    """ClientTls from flags/settings; None (plaintext) when none is given."""
    if not ca and not cert and not key:
        return None
    return ClientTls(Path(ca) if ca else None, Path(cert) if cert else None, Path(key) if key else None)


def read_token_file(path: str | Path | None) -> str | None:
    """The token in a file (its first line, stripped), or None without a file."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip().splitlines()
    except OSError as error:
        raise TlsConfigError(f"cannot read the token file {path}: {error.strerror or error}") from None
    if not token or not token[0].strip():
        raise TlsConfigError(f"the token file {path} is empty")
    return token[0].strip()


Metadata = Sequence[tuple[str, str]]


class _TokenInterceptor:
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self._entry]
        return details._replace(metadata=metadata)


class _SyncTokenInterceptor(
    _TokenInterceptor,
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _AioTokenInterceptor(
    _TokenInterceptor,
    grpc.aio.UnaryUnaryClientInterceptor,
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


# A channel's own reconnect backoff, bounded: by default gRPC waits 1 s, then 1.6x more each
# time up to 120 s, so after a 30 s outage of the service behind it the next attempt came 16 s
# later (measured: attempts at 1.0, 2.3, 4.4, 9.1, 15.8, 26.0, 42.1 s) and every call until
# then failed although that service was back. With these a channel tries every 0.25-1 s
# (±20 % jitter) while the other side is down: one refused connection a second.
RECONNECT_BACKOFF_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def open_channel(
    address: str,
    tls: ClientTls | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel: TLS when ``tls`` is given, the token on every call."""
    channel = (
        grpc.secure_channel(address, tls.credentials(), options=list(options))
        if tls is not None
        else grpc.insecure_channel(address, options=list(options))
    )
    return grpc.intercept_channel(channel, _SyncTokenInterceptor(token)) if token else channel


def open_aio_channel(
    address: str,
    tls: ClientTls | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel: TLS when ``tls`` is given, the token on every call."""
    interceptors = [_AioTokenInterceptor(token)] if token else None
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials(), options=list(options), interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
