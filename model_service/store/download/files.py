"""One file onto disk: PartialFile (``.part`` plus sidecar, resumable across restarts) and
FileDownloader (Range resumes, endpoint fallback, hashing while writing, size and hash checks)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx2

from model_service.errors import DownloadCancelled, IntegrityError, SourcesFailed
from model_service.paths import remove_path
from model_service.store.download.hub import BodyDropped, HubClient, RemoteFile, SourceError
from model_service.store.download.retry import FILE_RETRY_KINDS, Retrier
from model_service.urls import display_url
from model_service.validator import FileHasher, hash_file

logger = logging.getLogger(__name__)


RETRYABLE_READ_ERRORS = (httpx2.TransportError, OSError)
_NO_SIDECAR = object()


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
        """Bytes already on disk that belong to ``identity``; stale partials are removed,
        and so are those whose sidecar is not what the store writes (logged, naming it)."""
        recorded: object = _NO_SIDECAR
        try:
            recorded = json.loads(self.sidecar.read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as error:
            logger.warning(
                "partial file's sidecar unreadable; the file starts over",
                extra={"file": str(self.sidecar), "error": str(error)},
            )
        if recorded == identity and self.part.is_file() and not self.part.is_symlink():
            size = self.part.stat().st_size
            if size <= int(identity["size"]):  # type: ignore[call-overload]
                return size
        elif recorded is not _NO_SIDECAR and not isinstance(recorded, dict):
            logger.warning(
                "partial file's sidecar of the wrong shape; the file starts over",
                extra={"file": str(self.sidecar), "found": type(recorded).__name__},
            )
        self.remove()
        return 0

    def kept_for_resume(self, identity: dict[str, object]) -> int:
        """After a local disk error: the bytes a resume will continue from, once the part
        file is checked against its sidecar and size (what fails is removed); 0 when the
        disk cannot even be read now. Appends go in order and buffered writes retry short
        writes, so what a failed write leaves is a prefix of the file: resumable."""
        try:
            return self.resumable_bytes(identity)
        except OSError:
            return 0

    def start(self, identity: dict[str, object]) -> None:
        self.part.parent.mkdir(parents=True, exist_ok=True)
        self.sidecar.write_text(json.dumps(identity, sort_keys=True))
        self.part.touch()

    def remove(self) -> None:
        """Remove the part file and its sidecar, whatever they are (a directory in their place too)."""
        for path in (self.part, self.sidecar):
            remove_path(path)


class LocalDiskError(Exception):
    """Reading or writing a download's own files failed (disk full, a file size limit, a
    read-only or broken filesystem): the store's disk, never the source's fault, so the
    Retrier neither retries it nor counts it against the endpoint. ``kept``: the bytes
    the partial file keeps for a resume."""

    def __init__(self, path: Path, error: OSError, operation: str = "write") -> None:
        super().__init__(f"cannot {operation} {path}: {error.strerror or error}")
        self.path = path
        self.error = error
        self.operation = operation
        self.kept = 0


@contextlib.contextmanager
def on_local_disk(path: Path, operation: str = "write") -> Iterator[None]:
    """OSErrors inside are the store's own disk failing at ``path``: LocalDiskError."""
    try:
        yield
    except OSError as error:
        raise LocalDiskError(path, error, operation) from error


@dataclass(frozen=True)
class DownloadedFile:
    """A file in its ``.part``, checked: where it came from, its sha256, the bytes this
    download received and where it resumed."""

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


class FileDownloader:
    """Downloads one file through the endpoint chain, resuming with Range, hashing while
    writing, checking size and hash before the caller moves it into place. Each endpoint's
    attempts run in the Retrier (breaker, backoff, budget)."""

    def __init__(self, hub: HubClient, retrier: Retrier) -> None:
        self.hub = hub
        self.retrier = retrier

    def download(
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
    ) -> DownloadedFile:
        """Download ``remote`` into ``partial.part``, trying ``endpoints`` in order.

        Blocking (network and fsync): run it in a worker thread. Raises SourcesFailed
        listing every endpoint's reason, IntegrityError when a source served bytes that
        fail the size or hash check (and none served good ones), DownloadCancelled when
        ``cancel`` is set, LocalDiskError at once (no retry, no other endpoint: none would
        help) when the store's own disk fails.
        """
        transfer = _Transfer(repo_id, commit, remote, partial, cancel, on_bytes)
        identity = partial.describe(repo_id, commit, remote)
        reasons: list[str] = []
        integrity_failures = 0
        for index, endpoint in enumerate(endpoints):
            transfer.check_cancel()
            try:
                result = self.retrier.call(
                    endpoint,
                    functools.partial(self._attempt, endpoint, transfer, identity),
                    retry_kinds=FILE_RETRY_KINDS,
                    cancel=cancel,
                    cancelled=f"download of {remote.path} cancelled",
                    log_fields={"file": remote.path},
                )
            except SourceError as failure:
                reasons.append(f"{display_url(endpoint)}: {failure.reason}")
                if failure.kind == "integrity":
                    integrity_failures += 1
                    on_verify_failed(failure.reason)
                on_source_failed(endpoint, failure.reason)
                continue
            why = "the manifest's source" if index == 0 else "fallback"
            logger.debug("source choice", extra={"file": remote.path, "endpoint": display_url(endpoint), "why": why})
            return result
        message = f"could not download {remote.path} of {repo_id}@{commit[:12]}: " + "; ".join(reasons)
        if integrity_failures:
            raise IntegrityError(message)
        raise SourcesFailed(message)

    def _attempt(self, endpoint: str, transfer: _Transfer, identity: dict[str, object]) -> DownloadedFile:
        """One request: resume what the part file holds, append the body, check the whole file.
        A file that fails its check is removed (its bytes are never resumed). A local disk
        error keeps what the part file holds, when it checks out, for a later resume."""
        transfer.check_cancel()
        partial, remote = transfer.partial, transfer.remote
        try:
            with on_local_disk(partial.part):
                offset = partial.resumable_bytes(identity)
                if offset == 0:
                    partial.start(identity)
            hasher, fetched = self._stream(endpoint, transfer, offset)
        except LocalDiskError as failure:
            failure.kept = partial.kept_for_resume(identity)
            raise
        problem = self._check(remote, hasher)
        if problem:
            partial.remove()
            raise SourceError(endpoint, problem, kind="integrity")
        return DownloadedFile(endpoint, hasher.sha256.hexdigest(), fetched, offset)

    def _stream(self, endpoint: str, transfer: _Transfer, offset: int) -> tuple[FileHasher, int]:
        """Append the body from ``offset`` to the part file; returns the hasher of the whole
        file and the bytes received now. Raises BodyDropped when the body breaks off,
        LocalDiskError when the part file cannot be read or written."""
        remote, part = transfer.remote, transfer.partial.part
        need_git = not remote.sha256
        with on_local_disk(part, "read"):
            if offset >= remote.size:
                return hash_file(part, remote.size, transfer.cancel, git_sha1=need_git), 0
            hasher = (
                hash_file(part, remote.size, transfer.cancel, git_sha1=need_git)
                if offset
                else FileHasher(remote.size, need_git)
            )
        with self.hub.open_file(endpoint, transfer.repo_id, transfer.commit, remote.path, offset) as (response, start):
            mode = "ab"
            if start != offset:  # the server ignored Range: start over, from byte 0
                hasher = FileHasher(remote.size, need_git)
                mode = "wb"
                transfer.on_bytes(-offset, endpoint)
            with on_local_disk(part), open(part, mode) as handle:  # closing flushes: inside too
                fetched = self._write_body(endpoint, transfer, response, handle, hasher)
        if hasher.size < remote.size:
            message = f"body ended after {hasher.size} of {remote.size} bytes"
            raise BodyDropped(endpoint, message, fetched > 0, hasher.size)
        return hasher, fetched

    @staticmethod
    def _write_body(
        endpoint: str, transfer: _Transfer, response: httpx2.Response, handle: IO[bytes], hasher: FileHasher
    ) -> int:
        """Append the body; only reading it can fail as the network (BodyDropped). A failed
        write or fsync raises its OSError: the store's disk, not the source."""
        remote = transfer.remote
        fetched = 0
        blocks = response.iter_bytes()  # as the network delivers, so cancel is prompt
        while True:
            try:
                block = next(blocks, None)
            except RETRYABLE_READ_ERRORS as error:
                handle.flush()
                os.fsync(handle.fileno())
                message = f"connection dropped after {hasher.size} of {remote.size} bytes ({type(error).__name__})"
                raise BodyDropped(endpoint, message, fetched > 0, hasher.size) from error
            if block is None:
                break
            transfer.check_cancel()
            handle.write(block)
            hasher.update(block)
            fetched += len(block)
            transfer.on_bytes(len(block), endpoint)
            if hasher.size > remote.size:
                raise SourceError(endpoint, f"{remote.path}: server sent more than {remote.size} bytes")
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
