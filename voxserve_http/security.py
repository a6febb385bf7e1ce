"""The gateway's TLS (its own port, and its channels to the backends), its backend token
and the rule against open exposure, from its settings.

The gateway checks no token itself: the services do, on the caller's forwarded
Authorization. So it counts as protected off loopback when it serves HTTPS, or when it
holds a backend token (the backends then run with tokens, and an anonymous caller gets
only that token's roles); anything else needs ``insecure``, as for the gRPC services.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from voxserve_common.config import ConfigError
from voxserve_common.security import client_security, is_loopback
from voxserve_common.tls import ClientTls, ServerTls, TlsConfigError, read_token_file, server_tls
from voxserve_http.config import GatewayConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySecurity:
    server: ServerTls | None = None  # HTTPS on the gateway's port (and its /metrics)
    store_tls: ClientTls | None = None
    inference_tls: ClientTls | None = None
    backend_token: str | None = None  # sent when the caller sent no Authorization

    def __repr__(self) -> str:  # never the token, wherever this object is printed
        return (
            f"GatewaySecurity(server={self.server!r}, store_tls={self.store_tls!r}, "
            f"inference_tls={self.inference_tls!r}, backend_token={'<set>' if self.backend_token else None})"
        )


def gateway_security(config: GatewayConfig) -> GatewaySecurity:
    """Read every certificate, key and token file now (fail at start-up, not at the
    first request); ConfigError naming the setting otherwise."""
    try:
        server = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    except TlsConfigError as error:
        raise ConfigError(f"invalid setting tls_cert/tls_key/tls_client_ca: {error}") from None
    store_tls, _ = client_security(
        config.store_tls_ca, config.store_tls_cert, config.store_tls_key, None, "store_tls_*"
    )
    inference_tls, _ = client_security(
        config.inference_tls_ca, config.inference_tls_cert, config.inference_tls_key, None, "inference_tls_*"
    )
    try:
        token = read_token_file(config.backend_token_file)
    except TlsConfigError as error:
        raise ConfigError(f"invalid setting backend_token_file: {error}") from None
    if server is None and token is None and not is_loopback(config.host) and not config.insecure:
        raise ConfigError(
            f"invalid setting host: binding {config.host} with neither TLS (tls_cert/tls_key) nor a "
            "backend_token_file serves the HTTP API in plaintext to anyone who can reach it; set "
            "tls_cert/tls_key, run the backends with auth_tokens and give the gateway a "
            "backend_token_file, bind 127.0.0.1, or pass --insecure to do it anyway"
        )
    if token is None:
        logger.info(
            "no backend_token_file: callers' Authorization headers are forwarded, calls without one reach "
            "the backends unauthenticated"
        )
    return GatewaySecurity(server, store_tls, inference_tls, token)
