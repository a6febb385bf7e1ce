"""Talking to Hugging Face hub endpoints (mirror first, official next) with huggingface_hub.

Metadata comes from ``HfApi(endpoint=...).model_info(files_metadata=True)``; file bytes
are streamed through huggingface_hub's own HTTP session with a ``Range`` header so a
download resumes from the bytes already on disk, even after a crash (which
``hf_hub_download`` does not do across processes).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
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
from model_service.errors import UnsafePath
from model_service.paths import validate_relative_file

logger = logging.getLogger(__name__)

OFFICIAL_ENDPOINT = "https://huggingface.co"
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

    def __init__(self, endpoint: str, reason: str, not_found: bool = False) -> None:
        super().__init__(f"{endpoint}: {reason}")
        self.endpoint = endpoint
        self.reason = reason
        self.not_found = not_found


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


def default_endpoints(configured: Sequence[str], hf_endpoint: str | None) -> tuple[str, ...]:
    """Configured endpoints in order; else HF_ENDPOINT (if set) then the official hub."""
    chosen = list(configured) if configured else [e for e in (hf_endpoint, OFFICIAL_ENDPOINT) if e]
    unique: list[str] = []
    for given in chosen:
        endpoint = given.rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"hub endpoint {endpoint!r} must start with http:// or https://")
        if endpoint not in unique:
            unique.append(endpoint)
    return tuple(unique)


class HubClient:
    """huggingface_hub calls against one endpoint at a time; the caller walks the chain."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 10.0, token: str | None = None) -> None:
        if not endpoints:
            raise ValueError("at least one hub endpoint is needed")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self.token = token

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
            raise SourceError(endpoint, reason, not_found) from error
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
                    raise SourceError(endpoint, "range not satisfiable")
                hf_raise_for_status(response)
            except SourceError:
                raise
            except Exception as error:
                reason, not_found = describe_error(error)
                raise SourceError(endpoint, reason, not_found) from error
            start = offset if response.status_code == 206 else 0
            # Errors while the caller reads the body propagate unchanged (drops, cancel).
            yield response, start
