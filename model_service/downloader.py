"""The resumable file fetcher: Range resumes, retries, endpoint fallback, hash checks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx2

from model_service.download_queue import DownloadJob, DownloadQueue
from model_service.errors import DownloadCancelled, IntegrityError, SourcesFailed
from model_service.hub import HubClient, RemoteFile, SourceBreakers, SourceError, backoff_delay, display_url
from model_service.validator import FileHasher, hash_file

__all__ = ["DownloadJob", "DownloadQueue", "FetchResult", "FileFetcher", "PartialFile"]  # queue re-exported

logger = logging.getLogger(__name__)


RETRYABLE_READ_ERRORS = (httpx2.TransportError, OSError)


@dataclass
class PartialFile:
    """A file being downloaded: ``<path>.part`` plus a sidecar saying what it will become,
    so a restarted store resumes only bytes that belong to the same file version."""

    part: Path
    sidecar: Path

    @classmethod
    def for_target(cls, partial_dir: Path, relative: Path) -> PartialFile:
        base = partial_dir / relative
        return cls(base.with_name(base.name + ".part"), base.with_name(base.name + ".part.json"))

    def describe(self, repo_id: str, commit: str, remote: RemoteFile) -> dict[str, object]:
        """What the sidecar records: the bytes resume only when all of it is the same."""
        return {
            "repo_id": repo_id,
            "commit": commit,
            "path": remote.path,
            "size": remote.size,
            "sha256": remote.sha256,
            "git_oid": remote.git_oid,
        }

    def resumable_bytes(self, identity: dict[str, object]) -> int:
        """Bytes already on disk that belong to ``identity``; stale partials are removed."""
        try:
            recorded = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == identity and self.part.is_file():
            size = self.part.stat().st_size
            if size <= int(identity["size"]):  # type: ignore[call-overload]
                return size
        self.remove()
        return 0

    def start(self, identity: dict[str, object]) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar.write_text(json.dumps(identity, sort_keys=True))
        self.part.touch()

    def remove(self) -> None:
        for path in (self.part, self.sidecar):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass(frozen=True)
class FetchResult:
    source: str
    sha256: str
    bytes_fetched: int
    resumed_from: int


@dataclass(frozen=True)
class _Transfer:
    """One file's download: what to fetch, where to write it, how to report and stop."""

    repo_id: str
    commit: str
    remote: RemoteFile
    partial: PartialFile
    cancel: threading.Event
    on_bytes: Callable[[int, str], None]

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise DownloadCancelled(f"download of {self.remote.path} cancelled")


class FileFetcher:
    """Fetches one file through the endpoint chain, resuming with Range, hashing while
    writing, checking size and hash before the caller moves it into place."""

    def __init__(
        self,
        hub: HubClient,
        chunk_size: int = 1 << 20,
        retries: int = 3,
        backoff: float = 0.25,
        breakers: SourceBreakers | None = None,
    ) -> None:
        self.hub = hub
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff = backoff
        self.breakers = breakers or SourceBreakers(hub.sources)

    def fetch(
        self,
        *,
        repo_id: str,
        commit: str,
        remote: RemoteFile,
        partial: PartialFile,
        endpoints: Sequence[str],
        cancel: threading.Event,
        on_bytes: Callable[[int, str], None],
        on_source_failed: Callable[[str, str], None] = lambda endpoint, reason: None,
        on_verify_failed: Callable[[str], None] = lambda reason: None,
    ) -> FetchResult:
        """Download ``remote`` into ``partial.part``, trying ``endpoints`` in order.

        Blocking (network and fsync): run it in a worker thread. Raises SourcesFailed
        listing every endpoint's reason, IntegrityError when a source served bytes that
        fail the size or hash check (and none served good ones), DownloadCancelled when
        ``cancel`` is set.
        """
        transfer = _Transfer(repo_id, commit, remote, partial, cancel, on_bytes)
        reasons: list[str] = []
        integrity_failures = 0
        for endpoint in endpoints:
            try:
                result = self._fetch_from(endpoint, transfer)
            except _EndpointFailed as failure:
                reasons.append(f"{display_url(endpoint)}: {failure.reason}")
                if failure.integrity:
                    integrity_failures += 1
                    on_verify_failed(failure.reason)
                on_source_failed(endpoint, failure.reason)
            else:
                return result
        message = f"could not download {remote.path} of {repo_id}@{commit[:12]}: " + "; ".join(reasons)
        if integrity_failures:
            raise IntegrityError(message)
        raise SourcesFailed(message)

    def _fetch_from(self, endpoint: str, transfer: _Transfer) -> FetchResult:
        """Attempts against one endpoint; a drop after new bytes resets the retry budget,
        a definitive not-found gives up on the endpoint at once. Retries wait with
        exponential backoff and jitter; every failed request counts in the endpoint's
        circuit breaker, and an open breaker ends the attempts at once."""
        remote, partial = transfer.remote, transfer.partial
        identity = partial.describe(transfer.repo_id, transfer.commit, remote)
        breakers = self.breakers
        attempts_left = self.retries
        failed_in_a_row = 0
        while True:
            transfer.check_cancel()
            refused = breakers.allow(endpoint)
            if refused:
                raise _EndpointFailed(refused)
            offset = partial.resumable_bytes(identity)
            if offset == 0:
                partial.start(identity)
            try:
                hasher, fetched = self._stream(endpoint, transfer, offset)
            except SourceError as error:
                attempts_left -= 1
                failed_in_a_row += 1
                if not error.not_found:
                    breakers.failure(endpoint, error.kind, error.reason)
                if error.not_found or attempts_left <= 0:
                    raise _EndpointFailed(error.reason) from error
                transfer.cancel.wait(backoff_delay(failed_in_a_row, self.backoff))
                continue
            except _DroppedConnection as error:
                if error.progressed:  # bytes flowed: the endpoint works, the network hiccuped
                    breakers.success(endpoint)
                    attempts_left, failed_in_a_row = self.retries, 0
                else:
                    breakers.failure(endpoint, "reset", str(error))
                    attempts_left, failed_in_a_row = attempts_left - 1, failed_in_a_row + 1
                if attempts_left <= 0:
                    raise _EndpointFailed(str(error)) from error
                logger.info(
                    "connection dropped; resuming",
                    extra={"file": remote.path, "endpoint": endpoint, "offset": partial.part.stat().st_size},
                )
                transfer.cancel.wait(backoff_delay(max(failed_in_a_row, 1), self.backoff))
                continue
            problem = self._check(remote, hasher)
            if problem:
                partial.remove()
                breakers.failure(endpoint, "integrity", problem)
                raise _EndpointFailed(problem, integrity=True)
            breakers.success(endpoint)
            return FetchResult(endpoint, hasher.sha256.hexdigest(), fetched, offset)

    def _stream(self, endpoint: str, transfer: _Transfer, offset: int) -> tuple[FileHasher, int]:
        """Append the body from ``offset`` to the part file; returns the hasher of the whole
        file and the bytes received now. Raises _DroppedConnection when the body breaks off."""
        remote = transfer.remote
        need_git = not remote.sha256
        if offset >= remote.size:
            return hash_file(transfer.partial.part, remote.size, transfer.cancel, git_sha1=need_git), 0
        hasher = (
            hash_file(transfer.partial.part, remote.size, transfer.cancel, git_sha1=need_git)
            if offset
            else FileHasher(remote.size, need_git)
        )
        with self.hub.open_file(endpoint, transfer.repo_id, transfer.commit, remote.path, offset) as (response, start):
            mode = "ab"
            if start != offset:  # the server ignored Range: start over, from byte 0
                hasher = FileHasher(remote.size, need_git)
                mode = "wb"
                transfer.on_bytes(-offset, endpoint)
            with open(transfer.partial.part, mode) as handle:
                fetched = self._write_body(endpoint, transfer, response, handle, hasher)
        if hasher.size < remote.size:
            raise _DroppedConnection(f"body ended after {hasher.size} of {remote.size} bytes", fetched > 0)
        return hasher, fetched

    @staticmethod
    def _write_body(
        endpoint: str, transfer: _Transfer, response: httpx2.Response, handle: IO[bytes], hasher: FileHasher
    ) -> int:
        remote = transfer.remote
        fetched = 0
        try:
            for block in response.iter_bytes():  # as the network delivers, so cancel is prompt
                transfer.check_cancel()
                handle.write(block)
                hasher.update(block)
                fetched += len(block)
                transfer.on_bytes(len(block), endpoint)
                if hasher.size > remote.size:
                    raise SourceError(endpoint, f"{remote.path}: server sent more than {remote.size} bytes")
        except RETRYABLE_READ_ERRORS as error:
            handle.flush()
            os.fsync(handle.fileno())
            raise _DroppedConnection(
                f"connection dropped after {hasher.size} of {remote.size} bytes ({type(error).__name__})",
                fetched > 0,
            ) from error
        handle.flush()
        os.fsync(handle.fileno())
        return fetched

    @staticmethod
    def _check(remote: RemoteFile, hasher: FileHasher) -> str:
        if hasher.size != remote.size:
            return f"size mismatch for {remote.path}: got {hasher.size} bytes, expected {remote.size}"
        if remote.sha256:
            actual = hasher.sha256.hexdigest()
            if actual != remote.sha256:
                return f"sha256 mismatch for {remote.path}: expected {remote.sha256}, got {actual}"
        elif remote.git_oid:
            actual = hasher.git_sha1.hexdigest()
            if actual != remote.git_oid:
                return f"git blob sha1 mismatch for {remote.path}: expected {remote.git_oid}, got {actual}"
        return ""


class _DroppedConnection(Exception):
    def __init__(self, message: str, progressed: bool) -> None:
        super().__init__(message)
        self.progressed = progressed


class _EndpointFailed(Exception):
    """An endpoint gave up on a file; ``integrity`` when its bytes failed the checks."""

    def __init__(self, reason: str, integrity: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.integrity = integrity
