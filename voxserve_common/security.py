"""From settings to a server's TLS and authentication, and the rule against open exposure.

Without tokens and without TLS a service answers anyone who can reach it: that is allowed
on loopback (the default bind address) and anywhere else only with an explicit
``insecure`` setting, so a misconfigured deployment fails at start-up instead of serving
every RPC to its network.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

from voxserve_common.auth import Authenticator, TokenFileError
from voxserve_common.config import ConfigError
from voxserve_common.tls import ClientTls, ServerTls, TlsConfigError, client_tls, read_token_file, server_tls

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; "" and 0.0.0.0 bind every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_security(config: Any, service: str) -> tuple[ServerTls | None, Authenticator | None]:
    """TLS and the authenticator a service's settings ask for (``tls_cert``, ``tls_key``,
    ``tls_client_ca``, ``auth_tokens``, ``insecure``, ``host``); ConfigError naming the
    setting when a file is unusable or the bind address would be open to its network."""
    try:
        tls = server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
    except TlsConfigError as error:
        raise ConfigError(f"invalid setting tls_cert/tls_key/tls_client_ca: {error}") from None
    try:
        authenticator = Authenticator(Path(config.auth_tokens)) if config.auth_tokens else None
    except TokenFileError as error:
        raise ConfigError(f"invalid setting auth_tokens: {error}") from None
    if authenticator is None and tls is None and not is_loopback(config.host) and not config.insecure:
        raise ConfigError(
            f"invalid setting host: binding {config.host} with neither auth_tokens nor TLS serves every RPC "
            "(delete, import, unload...) to anyone who can reach it; set auth_tokens and tls_cert/tls_key, "
            "bind 127.0.0.1, or pass --insecure to do it anyway"
        )
    if authenticator is None:
        logger.warning(
            "authentication is off: every RPC is open to whoever reaches the port; set auth_tokens",
            extra={"service": service, "host": config.host, "tls": tls is not None},
        )
    return tls, authenticator


def client_security(ca: Any, cert: Any, key: Any, token_file: Any, setting: str) -> tuple[ClientTls | None, str | None]:
    """A client's TLS and token from its settings; ConfigError naming ``setting`` otherwise."""
    try:
        tls = client_tls(ca, cert, key)
        if tls is not None:
            tls.credentials()  # read the files now: fail at start-up
        return tls, read_token_file(token_file)
    except TlsConfigError as error:
        raise ConfigError(f"invalid setting {setting}: {error}") from None
