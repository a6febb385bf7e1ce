"""The download queue (FIFO, N at a time, dedupe) and the resumable file fetcher."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

from model_service.errors import DownloadCancelled, IntegrityError, SourcesFailed
from model_service.hub import HubClient, RemoteFile, SourceError
from model_service.validator import FileHasher, hash_file

logger = logging.getLogger(__name__)


@dataclass
class DownloadJob:
    """One pull of one model; every PullModel of the same model while it waits or runs
    joins this object instead of starting another download."""

    model_id: str
    revision: str | None
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    joiners: int = 1
    # Files already on disk were hashed when stored and nothing has found them bad since
    # (the model was READY): a size check is enough to keep them.
    trust_sizes: bool = False
    _done_callbacks: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self.done_event.is_set()

    def add_done_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the finishing thread) when the job ends; at once if it has.
        Streams use it to notice the end, which publishes no event of its own."""
        self._done_callbacks.append(callback)
        if self.done_event.is_set():
            callback()

    def remove_done_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._done_callbacks.remove(callback)

    def finish(self, error: BaseException | None) -> None:
        self.error = error
        self.done_event.set()
        for callback in list(self._done_callbacks):
            callback()


class DownloadQueue:
    """FIFO of jobs run by ``max_concurrent`` worker threads; never rejects a job."""

    def __init__(
        self,
        run: Callable[[DownloadJob], None],
        max_concurrent: int = 1,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._run = run
        self._on_change = on_change or (lambda: None)
        self._cond = threading.Condition()
        self._waiting: collections.deque[DownloadJob] = collections.deque()
        self._running: dict[str, DownloadJob] = {}
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._work, name=f"download-worker-{i}", daemon=True) for i in range(max_concurrent)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, model_id: str, revision: str | None, trust_sizes: bool = False) -> tuple[DownloadJob, bool]:
        """Queue a job, or return the waiting/running one of the same model (joined=True)."""
        with self._cond:
            existing = self.active(model_id)
            if existing is not None:
                existing.joiners += 1
                return existing, True
            job = DownloadJob(model_id, revision, trust_sizes=trust_sizes)
            self._waiting.append(job)
            self._cond.notify()
        self._on_change()
        return job, False

    def active(self, model_id: str) -> DownloadJob | None:
        with self._cond:
            if model_id in self._running:
                return self._running[model_id]
            for job in self._waiting:
                if job.model_id == model_id:
                    return job
            return None

    def position(self, model_id: str) -> int:
        """1-based place in the waiting line; 0 when running or absent."""
        with self._cond:
            for index, job in enumerate(self._waiting):
                if job.model_id == model_id:
                    return index + 1
            return 0

    def waiting_ids(self) -> list[str]:
        with self._cond:
            return [job.model_id for job in self._waiting]

    def cancel(self, model_id: str) -> DownloadJob | None:
        """Signal a running job to stop, or take a waiting one out of the line."""
        removed = None
        with self._cond:
            job = self._running.get(model_id)
            if job is not None:
                job.cancel_event.set()
                return job
            for candidate in self._waiting:
                if candidate.model_id == model_id:
                    removed = candidate
                    break
            if removed is not None:
                self._waiting.remove(removed)
                removed.cancel_event.set()
        if removed is not None:
            removed.finish(DownloadCancelled(f"download of {model_id} cancelled while waiting"))
            self._on_change()
        return removed

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything and join the workers."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._running.values():
                job.cancel_event.set()
            self._cond.notify_all()
        for job in waiting:
            job.cancel_event.set()
            job.finish(DownloadCancelled("store shutting down"))
        for worker in self._workers:
            worker.join(timeout)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                job.started_at = time.monotonic()
                self._running[job.model_id] = job
            self._on_change()
            try:
                job.context.run(self._run, job)
            except BaseException as error:
                if not job.done_event.is_set():
                    job.finish(error)
                logger.debug("download job ended with error", exc_info=error)
            else:
                if not job.done_event.is_set():
                    job.finish(None)
            finally:
                with self._cond:
                    self._running.pop(job.model_id, None)
                self._on_change()


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


@dataclass
class FetchResult:
    source: str
    sha256: str
    bytes_fetched: int
    resumed_from: int


class FileFetcher:
    """Fetches one file through the endpoint chain, resuming with Range, hashing while
    writing, checking size and hash before the caller moves it into place."""

    def __init__(self, hub: HubClient, chunk_size: int = 1 << 20, retries: int = 3, backoff: float = 0.25) -> None:
        self.hub = hub
        self.chunk_size = chunk_size
        self.retries = retries
        self.backoff = backoff

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
        """Download ``remote`` into ``partial.part``; raises SourcesFailed listing every
        endpoint's reason, IntegrityError when every source served wrong bytes,
        DownloadCancelled when ``cancel`` is set."""
        identity = partial.describe(repo_id, commit, remote)
        reasons: list[str] = []
        integrity_failures = 0
        for endpoint in endpoints:
            attempts_left = self.retries
            while True:
                if cancel.is_set():
                    raise DownloadCancelled(f"download of {remote.path} cancelled")
                offset = partial.resumable_bytes(identity)
                if offset == 0:
                    partial.start(identity)
                resumed_from = offset
                try:
                    need_git = not remote.sha256
                    hasher = (
                        hash_file(partial.part, remote.size, cancel, git_sha1=need_git)
                        if offset
                        else FileHasher(remote.size, need_git)
                    )
                    fetched = self._stream(endpoint, repo_id, commit, remote, partial, hasher, offset, cancel, on_bytes)
                except SourceError as error:
                    if error.not_found:
                        reasons.append(f"{endpoint}: {error.reason}")
                        on_source_failed(endpoint, error.reason)
                        break
                    attempts_left -= 1
                    if attempts_left <= 0:
                        reasons.append(f"{endpoint}: {error.reason}")
                        on_source_failed(endpoint, error.reason)
                        break
                    if cancel.wait(self.backoff):
                        continue
                    continue
                except _DroppedConnection as error:
                    if error.progressed:
                        attempts_left = self.retries
                    else:
                        attempts_left -= 1
                    if attempts_left <= 0:
                        reasons.append(f"{endpoint}: {error}")
                        on_source_failed(endpoint, str(error))
                        break
                    logger.info(
                        "connection dropped; resuming",
                        extra={"file": remote.path, "endpoint": endpoint, "offset": partial.part.stat().st_size},
                    )
                    cancel.wait(self.backoff)
                    continue
                problem = self._check(remote, hasher)
                if problem:
                    partial.remove()
                    integrity_failures += 1
                    on_verify_failed(problem)
                    reasons.append(f"{endpoint}: {problem}")
                    on_source_failed(endpoint, problem)
                    break
                return FetchResult(endpoint, hasher.sha256.hexdigest(), fetched, resumed_from)
        message = f"could not download {remote.path} of {repo_id}@{commit[:12]}: " + "; ".join(reasons)
        if integrity_failures:
            raise IntegrityError(message)
        raise SourcesFailed(message)

    def _stream(
        self,
        endpoint: str,
        repo_id: str,
        commit: str,
        remote: RemoteFile,
        partial: PartialFile,
        hasher: FileHasher,
        offset: int,
        cancel: threading.Event,
        on_bytes: Callable[[int, str], None],
    ) -> int:
        if offset >= remote.size:
            return 0
        fetched = 0
        with self.hub.open_file(endpoint, repo_id, commit, remote.path, offset) as (response, start):
            mode = "ab"
            if start != offset:
                # The server ignored Range: start over, from byte 0.
                hasher.__init__(remote.size, not remote.sha256)  # type: ignore[misc]
                mode = "wb"
                on_bytes(-offset, endpoint)
            with open(partial.part, mode) as handle:
                try:
                    for block in response.iter_bytes():  # as the network delivers, so cancel is prompt
                        if cancel.is_set():
                            raise DownloadCancelled(f"download of {remote.path} cancelled")
                        handle.write(block)
                        hasher.update(block)
                        fetched += len(block)
                        on_bytes(len(block), endpoint)
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
        if hasher.size < remote.size:
            raise _DroppedConnection(f"body ended after {hasher.size} of {remote.size} bytes", fetched > 0)
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
