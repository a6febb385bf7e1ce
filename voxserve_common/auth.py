"""Token authentication with roles, enforced once for every RPC of both services.

The tokens file holds no token, only each token's hex sha256 and its roles:

    tokens:
      ci-bot: {sha256: 3f1c...e9, roles: [read, transcribe]}
      ops:    {sha256: 9a2b...41, roles: [admin]}

Roles never imply one another, except ``admin``, which allows everything. No grpc here:
the server interceptor hands the method name and the metadata to ``Authenticator``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from voxserve_common.errors import PermissionDenied, Unauthenticated

logger = logging.getLogger(__name__)

ROLES = ("read", "pull", "transcribe", "admin")
AUTH_FAILURE_REASONS = ("missing", "malformed", "invalid", "forbidden")

# The role each RPC needs, by "Service/Method" (the package is left out so that v2 APIs keep
# their rules only where they say so). Anything not listed needs admin: a new RPC is closed
# until someone decides who may call it.
METHOD_ROLES: Mapping[str, str] = {
    "ModelStore/ListModels": "read",
    "ModelStore/GetModel": "read",
    "ModelStore/WatchModels": "read",
    "ModelStore/VerifyModel": "read",
    "ModelStore/FetchModelFiles": "read",
    "ModelStore/ListSources": "read",
    "ModelStore/PullModel": "pull",
    "Inference/ListLoadedModels": "read",
    "Inference/GetCacheStats": "read",
    "Inference/WatchJob": "read",
    "Inference/Transcribe": "transcribe",
    "Inference/TranscribeStream": "transcribe",
    "Inference/StreamingTranscribe": "transcribe",
    "Inference/CancelJob": "transcribe",
}
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class TokenFileError(ValueError):
    """The tokens file is missing, unreadable or malformed (a start-up configuration error)."""


@dataclass(frozen=True)
class Principal:
    """Who a call authenticated as: the token's name in the file and its roles."""

    name: str
    roles: frozenset[str]

    def allows(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles


def role_for(method: str) -> str | None:
    """The role a full gRPC method name needs; None for health and reflection."""
    service_path, _, name = method.lstrip("/").partition("/")
    if service_path in OPEN_SERVICES:
        return None
    service = service_path.rsplit(".", 1)[-1]
    return METHOD_ROLES.get(f"{service}/{name}", "admin")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_tokens(data: Any, source: str) -> dict[str, Principal]:
    """sha256 -> Principal from the YAML structure; TokenFileError naming what is wrong."""
    if not isinstance(data, Mapping) or not isinstance(data.get("tokens"), Mapping):
        raise TokenFileError(f"{source}: expected a mapping 'tokens: {{NAME: {{sha256: HEX, roles: [...]}}}}'")
    principals: dict[str, Principal] = {}
    for name, entry in data["tokens"].items():
        if not isinstance(name, str) or not _TOKEN_NAME.fullmatch(name):
            raise TokenFileError(f"{source}: token name {str(name)[:40]!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if not isinstance(entry, Mapping):
            raise TokenFileError(f"{source}: tokens.{name} must be a mapping with sha256 and roles")
        digest = str(entry.get("sha256", "")).lower()
        if not _HEX_SHA256.fullmatch(digest):
            raise TokenFileError(
                f"{source}: tokens.{name}.sha256 must be the 64-hex-digit sha256 of the token, not the token itself"
            )
        roles = entry.get("roles")
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            raise TokenFileError(f"{source}: tokens.{name}.roles must be a non-empty list of {', '.join(ROLES)}")
        if digest in principals:
            raise TokenFileError(f"{source}: tokens.{name} has the same sha256 as tokens.{principals[digest].name}")
        principals[digest] = Principal(name, frozenset(roles))
    return principals


def load_tokens(path: Path) -> dict[str, Principal]:
    try:
        text = path.read_text()
    except OSError as error:
        raise TokenFileError(f"cannot read the tokens file {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TokenFileError(f"{path}: not valid YAML: {error}") from None
    return parse_tokens(data, str(path))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""
    return None


class FailureLog:
    """Logs failed authentications with their peer, at most ``per_minute`` lines a minute
    (a flood must not fill the disk); the count of lines held back goes with the next one."""

    def __init__(self, per_minute: int = 30) -> None:
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._window = 0.0
        self._logged = 0
        self._suppressed = 0

    def log(self, reason: str, method: str, peer: str, who: str = "") -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._window >= 60:
                self._window, self._logged = now, 0
            if self._logged >= self.per_minute:
                self._suppressed += 1
                return False
            self._logged += 1
            suppressed, self._suppressed = self._suppressed, 0
        logger.warning(
            "authentication failed",
            extra={"reason": reason, "rpc_method": method, "peer": peer, "token_name": who, "suppressed": suppressed},
        )
        return True


class Authenticator:
    """Checks each call's bearer token and role against the tokens file.

    The file is re-read when its modification time changes (checked at most once a second)
    or on ``reload()`` (SIGHUP), so tokens rotate without a restart; a broken new file keeps
    the previous tokens and logs why.
    """

    def __init__(self, path: Path, on_failure: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._principals = load_tokens(path)
        self._mtime = _mtime(path)
        self._checked = time.monotonic()
        self.on_failure = on_failure  # called with the reason of each failure (metrics)
        self.failures = FailureLog()

    def reload(self) -> None:
        try:
            principals = load_tokens(self.path)
        except TokenFileError as error:
            logger.error("tokens file not reloaded; the previous tokens stay in force", extra={"error": str(error)})
            return
        with self._lock:
            self._principals = principals
            self._mtime = _mtime(self.path)
        logger.info("tokens file reloaded", extra={"tokens": len(principals)})

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        if _mtime(self.path) != self._mtime:
            self.reload()

    def authorize(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> Principal | None:
        """The caller's Principal; None for open methods. Raises Unauthenticated without a
        valid token and PermissionDenied (naming the role) when its roles do not allow it."""
        role = role_for(method)
        if role is None:
            return None
        self._maybe_reload()
        token = bearer_token(metadata)
        if not token:
            self._fail("missing" if token is None else "malformed", method, peer)
            raise Unauthenticated(
                "this service needs a token: send the metadata 'authorization: Bearer <token>' "
                "(voxctl --token-file, VOXCTL_TOKEN)"
            )
        digest = token_sha256(token)
        with self._lock:
            principals = self._principals
        principal = next((p for d, p in principals.items() if hmac.compare_digest(d, digest)), None)
        if principal is None:
            self._fail("invalid", method, peer)
            raise Unauthenticated("the token is not valid here (unknown or revoked); ask for a new one")
        if not principal.allows(role):
            self._fail("forbidden", method, peer, principal.name)
            name = method.rsplit("/", 1)[-1]
            raise PermissionDenied(
                f"token {principal.name!r} (roles: {', '.join(sorted(principal.roles))}) lacks the role {role!r} "
                f"that {name} needs"
            )
        return principal

    def _fail(self, reason: str, method: str, peer: str, who: str = "") -> None:
        if self.on_failure is not None:
            self.on_failure(reason)
        self.failures.log(reason, method, peer, who)


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return -1.0
