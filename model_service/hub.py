"""Talking to Hugging Face hub endpoints (mirror first, official next) with huggingface_hub.

Metadata comes from ``HfApi(endpoint=...).model_info(files_metadata=True)``; file bytes
are streamed through huggingface_hub's own HTTP session with a ``Range`` header so a
download resumes from the bytes already on disk, even after a crash (which
``hf_hub_download`` does not do across processes).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import httpx2
from huggingface_hub import HfApi, get_session, hf_hub_url, hf_raise_for_status
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

# Public (documented as huggingface_hub.utils.build_hf_headers) but imported there only under
# TYPE_CHECKING without an explicit re-export, so mypy --strict flags it; the type still resolves.
from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

from model_service.catalog import CatalogEntry
from model_service.errors import UnknownSource, UnsafePath
from model_service.paths import validate_relative_file
from voxserve_common.client_strings import shown

logger = logging.getLogger(__name__)

OFFICIAL_ENDPOINT = "https://huggingface.co"
OFFICIAL_NAME = "official"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

# Bounded values of the ``reason`` label of voxserve_source_failures_total.
FAILURE_KINDS = ("http_5xx", "http_4xx", "connection", "reset", "timeout", "integrity", "other")
# Worth another attempt on the same endpoint (within download_retries): the next try may
# work. A refused connection means the endpoint is down: the next endpoint is tried at once.
TRANSIENT_KINDS = frozenset({"http_5xx", "reset", "timeout"})
MAX_BACKOFF_SECONDS = 10.0


@dataclass(frozen=True)
class Source:
    """A configured hub endpoint and the name a pull can choose it by."""

    name: str
    url: str


def display_url(url: str) -> str:
    """``url`` without its user:password@ part: how an endpoint appears in messages,
    events, model records' views and spans (the requests still use the full URL)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def parse_source(given: str) -> Source:
    """``name=URL`` or a plain URL (named ``official`` for the official hub, else its host)."""
    name, sep, rest = given.partition("=")
    if sep and "://" not in name:
        url = rest.strip().rstrip("/")
        name = name.strip()
        if not _SOURCE_NAME.fullmatch(name):
            raise ValueError(f"hub endpoint name {name!r} must be letters, digits, '_', '.', ':' or '-'")
    else:
        url = given.strip().rstrip("/")
        name = ""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"hub endpoint {display_url(url)!r} must start with http:// or https://")
    if not name:
        name = OFFICIAL_NAME if url == OFFICIAL_ENDPOINT else urllib.parse.urlsplit(display_url(url)).netloc
    return Source(name, url)


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str  # "" for non-LFS files (the hub only gives a git blob sha1 for those)
    git_oid: str


@dataclass(frozen=True)
class RemoteManifest:
    """The files of one repo revision that the catalog entry asks for."""

    repo_id: str
    commit: str
    files: tuple[RemoteFile, ...]
    endpoint: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


class SourceError(Exception):
    """One endpoint failed; ``not_found`` tells a definitive 404 from an outage."""

    def __init__(self, endpoint: str, reason: str, not_found: bool = False, kind: str = "other") -> None:
        super().__init__(f"{display_url(endpoint)}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.not_found = not_found
        self.kind = kind  # one of FAILURE_KINDS

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


def failure_kind(error: BaseException) -> str:
    """The FAILURE_KINDS value of a failed request (the metric's bounded reason label)."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return "http_5xx" if error.response.status_code >= 500 else "http_4xx"
    if isinstance(error, httpx2.TimeoutException):
        return "timeout"
    if isinstance(error, httpx2.ConnectError):
        return "connection"
    if isinstance(error, (httpx2.ReadError, httpx2.RemoteProtocolError, httpx2.WriteError, ConnectionError)):
        return "reset"
    return "other"


def backoff_delay(attempt: int, base: float) -> float:
    """Exponential backoff with jitter before retry ``attempt`` (1, 2, ...): between half
    and all of base * 2^(attempt-1), capped, so retries of many clients spread out."""
    ceiling = min(base * 2 ** max(attempt - 1, 0), MAX_BACKOFF_SECONDS)
    return float(ceiling * random.uniform(0.5, 1.0))


def describe_error(error: BaseException) -> tuple[str, bool]:
    """A short reason for a failed request and whether it was a definitive not-found."""
    if isinstance(error, RepositoryNotFoundError):
        return "repository not found", True
    if isinstance(error, RevisionNotFoundError):
        return "revision not found", True
    if isinstance(error, RemoteEntryNotFoundError):
        return "file not found", True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}", error.response.status_code == 404
    if isinstance(error, httpx2.ConnectError):
        return f"connection failed ({error})", False
    if isinstance(error, httpx2.TimeoutException):
        return f"timed out ({type(error).__name__})", False
    if isinstance(error, httpx2.HTTPError):
        return f"{type(error).__name__}: {error}", False
    return f"{type(error).__name__}: {error}", False


def default_sources(configured: Sequence[str], hf_endpoint: str | None) -> tuple[Source, ...]:
    """Configured endpoints (``name=URL`` or URL) in order; else HF_ENDPOINT (if set) then
    the official hub. A URL given twice counts once; two endpoints with one name are refused."""
    chosen = list(configured) if configured else [e for e in (hf_endpoint, OFFICIAL_ENDPOINT) if e]
    unique: list[Source] = []
    for given in chosen:
        source = parse_source(given)
        if any(s.url == source.url for s in unique):
            continue
        if any(s.name == source.name for s in unique):
            raise ValueError(f"two hub endpoints are named {source.name!r}; name them apart (name=URL)")
        unique.append(source)
    return tuple(unique)


def default_endpoints(configured: Sequence[str], hf_endpoint: str | None) -> tuple[str, ...]:
    """The URLs of default_sources."""
    return tuple(s.url for s in default_sources(configured, hf_endpoint))


class HubClient:
    """huggingface_hub calls against one endpoint at a time; the caller walks the chain."""

    def __init__(self, endpoints: Sequence[str | Source], timeout: float = 10.0, token: str | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one hub endpoint is needed")
        self.sources = tuple(e if isinstance(e, Source) else parse_source(e) for e in endpoints)
        self.endpoints = tuple(s.url for s in self.sources)
        self.timeout = timeout
        self.token = token

    def find_source(self, wanted: str) -> Source:
        """The configured source named ``wanted`` (or with that URL); UnknownSource otherwise."""
        for source in self.sources:
            if wanted in (source.name, source.url, source.url + "/"):
                return source
        known = ", ".join(f"{s.name} ({s.url})" for s in self.sources)
        raise UnknownSource(f"unknown source {shown(wanted)}; configured sources: {known}")

    def name_of(self, url: str) -> str:
        for source in self.sources:
            if source.url == url:
                return source.name
        return url

    def manifest(self, endpoint: str, entry: CatalogEntry, revision: str) -> RemoteManifest:
        """The allowed files of ``entry`` at ``revision`` with sizes and hashes.

        Raises SourceError for this endpoint; UnsafePath if the hub names a file that
        could escape the model directory.
        """
        api = HfApi(endpoint=endpoint, token=self.token or False)
        try:
            info = api.model_info(entry.repo_id, revision=revision, files_metadata=True, timeout=self.timeout)
        except Exception as error:
            reason, not_found = describe_error(error)
            raise SourceError(endpoint, reason, not_found, failure_kind(error)) from error
        commit = info.sha or ""
        if not _COMMIT.fullmatch(commit):
            raise SourceError(endpoint, f"hub answered without a valid commit sha ({commit!r})")
        files = []
        for sibling in info.siblings or []:
            name = sibling.rfilename
            if not entry.allows(name):
                continue
            try:
                validate_relative_file(name)
            except UnsafePath:
                logger.warning(
                    "hub listed an unsafe file name; refusing the repo", extra={"file": name, "endpoint": endpoint}
                )
                raise
            if sibling.size is None:
                raise SourceError(endpoint, f"hub gave no size for {name}")
            sha256 = sibling.lfs.sha256 if sibling.lfs is not None else ""
            files.append(RemoteFile(name, int(sibling.size), sha256 or "", sibling.blob_id or ""))
        if not files:
            raise SourceError(
                endpoint, f"no files of {entry.repo_id}@{revision} match {list(entry.allow_patterns)}", True
            )
        missing = [name for name in entry.required_files if name not in {f.path for f in files}]
        if missing:
            raise SourceError(endpoint, f"required files missing from {entry.repo_id}@{commit[:12]}: {missing}", True)
        return RemoteManifest(entry.repo_id, commit, tuple(sorted(files, key=lambda f: f.path)), endpoint)

    @contextlib.contextmanager
    def open_file(
        self, endpoint: str, repo_id: str, commit: str, path: str, offset: int
    ) -> Iterator[tuple[httpx2.Response, int]]:
        """GET a file from ``offset``; yields (response, start) where start is where the
        body begins (0 when the server ignored the Range header)."""
        url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint)
        headers = build_hf_headers(token=self.token or False)
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        timeout = httpx2.Timeout(self.timeout, read=max(self.timeout, 30.0))
        with contextlib.ExitStack() as stack:
            try:
                response = stack.enter_context(
                    get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True)
                )
                if response.status_code == 416 and offset > 0:
                    raise SourceError(endpoint, "range not satisfiable", kind="http_4xx")
                hf_raise_for_status(response)
            except SourceError:
                raise
            except Exception as error:
                reason, not_found = describe_error(error)
                raise SourceError(endpoint, reason, not_found, failure_kind(error)) from error
            start = offset if response.status_code == 206 else 0
            # Errors while the caller reads the body propagate unchanged (drops, cancel).
            yield response, start


# --------------------------------------------------------------------------- circuit breakers


class BreakerState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass(frozen=True)
class SourceHealth:
    """What ListSources shows of one endpoint (wall-clock timestamps, None when never)."""

    name: str
    url: str
    last_success_at: float | None
    last_failure_at: float | None
    last_failure_reason: str
    consecutive_failures: int
    state: BreakerState
    retry_after_seconds: float


@dataclass
class _Breaker:
    source: Source
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0  # monotonic: when it opened, or when the half-open probe began
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_failure_reason: str = ""


class SourceObserver:
    """Told of every failure and breaker change (the metrics); the default does nothing."""

    def failure(self, source: str, kind: str) -> None:
        """One failed request to ``source``."""

    def state_changed(self, source: str, state: BreakerState) -> None:
        """The breaker of ``source`` moved to ``state``."""


class SourceBreakers:
    """A circuit breaker per endpoint: after ``threshold`` consecutive failed requests the
    endpoint is skipped for ``cooldown`` seconds (a dead mirror then costs a pull nothing
    instead of a timeout), then one half-open probe closes it again or reopens it.

    Thread safe; ``allow`` before a request, ``success`` / ``failure`` after it. A definitive
    not-found is an answer, not an outage: callers report it as neither.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        threshold: int = 3,
        cooldown: float = 30.0,
        observer: SourceObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._observer = observer or SourceObserver()
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers = {s.url: _Breaker(s) for s in sources}
        for source in sources:
            self._observer.state_changed(source.name, BreakerState.CLOSED)

    def allow(self, url: str) -> str:
        """ "" when a request to ``url`` may go out now, else why not (circuit open)."""
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None or breaker.state == BreakerState.CLOSED:
                return ""
            waited = self._clock() - breaker.opened_at
            if waited < self.cooldown:
                what = "open" if breaker.state == BreakerState.OPEN else "half-open, probe in flight"
                return (
                    f"circuit {what} after {breaker.failures} consecutive failures "
                    f"(last: {breaker.last_failure_reason}); retry in {self.cooldown - waited:.1f}s"
                )
            # Cool-down over (or a probe that never reported back): this request is the probe.
            breaker.opened_at = self._clock()
            self._move(breaker, BreakerState.HALF_OPEN)
            return ""

    def success(self, url: str) -> None:
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None:
                return
            breaker.failures = 0
            breaker.last_success_at = time.time()
            if breaker.state != BreakerState.CLOSED:
                self._move(breaker, BreakerState.CLOSED)

    def failure(self, url: str, kind: str, reason: str) -> None:
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None:
                return
            breaker.failures += 1
            breaker.last_failure_at = time.time()
            breaker.last_failure_reason = reason
            self._observer.failure(breaker.source.name, kind if kind in FAILURE_KINDS else "other")
            if breaker.state == BreakerState.HALF_OPEN or (
                breaker.state == BreakerState.CLOSED and breaker.failures >= self.threshold
            ):
                breaker.opened_at = self._clock()
                self._move(breaker, BreakerState.OPEN)

    def _move(self, breaker: _Breaker, state: BreakerState) -> None:
        previous, breaker.state = breaker.state, state
        extra: dict[str, object] = {
            "source": breaker.source.name,
            "endpoint": breaker.source.url,
            "from_state": previous.value,
            "to_state": state.value,
            "consecutive_failures": breaker.failures,
        }
        if state == BreakerState.OPEN:
            extra["cooldown_seconds"] = self.cooldown
            extra["reason"] = breaker.last_failure_reason
            logger.warning("source circuit opened; skipping it during the cool-down", extra=extra)
        else:
            message = (
                "source circuit half-open: probing" if state == BreakerState.HALF_OPEN else "source circuit closed"
            )
            logger.info(message, extra=extra)
        self._observer.state_changed(breaker.source.name, state)

    def health(self) -> list[SourceHealth]:
        with self._lock:
            now = self._clock()
            return [
                SourceHealth(
                    name=b.source.name,
                    url=b.source.url,
                    last_success_at=b.last_success_at,
                    last_failure_at=b.last_failure_at,
                    last_failure_reason=b.last_failure_reason,
                    consecutive_failures=b.failures,
                    state=b.state,
                    retry_after_seconds=(
                        max(0.0, self.cooldown - (now - b.opened_at)) if b.state == BreakerState.OPEN else 0.0
                    ),
                )
                for b in self._breakers.values()
            ]
