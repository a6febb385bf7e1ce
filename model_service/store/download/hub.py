"""Talking to one Hugging Face hub endpoint at a time with huggingface_hub.

Metadata comes from ``HfApi(endpoint=...).model_info(files_metadata=True)``; file bytes
are streamed through huggingface_hub's own HTTP session with a ``Range`` header so a
download resumes from the bytes already on disk, even after a crash (which
``hf_hub_download`` does not do across processes). At DEBUG every HTTP request these calls
send is logged with its outcome (``_RequestLog``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

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
from model_service.store.download.sources import Source, parse_source
from model_service.urls import display_url, url_without_credentials
from voxserve_common.client_strings import shown

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


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


class CircuitOpen(SourceError):
    """The endpoint's circuit breaker refused the request (``attempts``: requests this call
    had sent to it before; 0 when the endpoint was skipped without one)."""

    def __init__(self, endpoint: str, reason: str, attempts: int) -> None:
        super().__init__(endpoint, reason)
        self.attempts = attempts


class BodyDropped(SourceError):
    """A file body broke off; ``progressed`` when bytes arrived first (the endpoint works,
    the network hiccuped), ``offset`` the bytes of the file now on disk."""

    def __init__(self, endpoint: str, reason: str, progressed: bool, offset: int) -> None:
        super().__init__(endpoint, reason, kind="reset")
        self.progressed = progressed
        self.offset = offset


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
        known = ", ".join(f"{s.name} ({display_url(s.url)})" for s in self.sources)
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
            with _RequestLog() as requests, requests.recording():
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
        # The log ends after the response is closed: it then knows the bytes and the time.
        with _RequestLog() as requests, contextlib.ExitStack() as stack:
            try:
                with requests.recording():
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


# --------------------------------------------------------------------------- DEBUG request log

# The requests and responses huggingface_hub's shared session handles while a _RequestLog
# records in this context (the calling thread's): its hooks see every request, redirects
# included, which the calls above cannot (HfApi.model_info hides its response).
_recorded: contextvars.ContextVar[list[httpx2.Request | httpx2.Response] | None] = contextvars.ContextVar(
    "hub_requests", default=None
)
_hooks_lock = threading.Lock()


def _record(message: httpx2.Request | httpx2.Response) -> None:
    seen = _recorded.get()
    if seen is not None:
        seen.append(message)


def _hook_session() -> None:
    """Put ``_record`` on huggingface_hub's shared session, once per session (close_session
    replaces it). Outside a recording the hook does nothing, so other users of the session
    are not affected."""
    hooks = get_session().event_hooks
    with _hooks_lock:
        for kind in ("request", "response"):
            if _record not in hooks[kind]:
                hooks[kind].append(_record)


class _RequestLog:
    """Logs at DEBUG each HTTP request sent while ``recording()``, when the log ends: method,
    URL without credentials or query, status, bytes received and seconds (``hub request``),
    or the error of a request that got no response (``hub request failed``). Costs nothing
    unless this module's logger is at DEBUG."""

    def __init__(self) -> None:
        self._active = logger.isEnabledFor(logging.DEBUG)
        self._seen: list[httpx2.Request | httpx2.Response] = []
        self._started = time.monotonic()

    def __enter__(self) -> _RequestLog:
        self._started = time.monotonic()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._active:
            self._log(exc, time.monotonic() - self._started)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        if not self._active:
            yield
            return
        _hook_session()
        token = _recorded.set(self._seen)
        try:
            yield
        finally:
            _recorded.reset(token)

    def _log(self, error: BaseException | None, seconds: float) -> None:
        responses = {id(m.request): m for m in self._seen if isinstance(m, httpx2.Response)}
        for request in (m for m in self._seen if isinstance(m, httpx2.Request)):
            fields: dict[str, object] = {"method": request.method, "url": url_without_credentials(str(request.url))}
            response = responses.get(id(request))
            if response is None:
                logger.debug(
                    "hub request failed", extra={**fields, "error": _reason(error), "seconds": round(seconds, 3)}
                )
                continue
            try:
                took = response.elapsed.total_seconds()
            except RuntimeError:  # not closed: the caller stopped before the body ended
                took = seconds
            fields.update(status=response.status_code, bytes=response.num_bytes_downloaded, seconds=round(took, 3))
            logger.debug("hub request", extra=fields)


def _reason(error: BaseException | None) -> str:
    if isinstance(error, SourceError):
        return error.reason
    return describe_error(error)[0] if error is not None else ""
