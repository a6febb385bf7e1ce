"""PullModel and CancelDownload: the download queue and the pipeline one job runs.

A job: resolve the manifest (endpoint chain) -> plan (keep files already good, resume
partials) -> check the disk -> fetch each missing file into partial/ -> move it into
models/ -> check sizes -> READY. Every state change goes through the registry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.download_queue import DownloadJob, DownloadQueue, StopReason
from model_service.downloader import FileFetcher, PartialFile
from model_service.errors import (
    DownloadCancelled,
    DownloadPaused,
    InsufficientDisk,
    IntegrityError,
    ModelBusy,
    ModelNotReady,
    RemoteNotFound,
    SourcesFailed,
    UnknownSource,
    UnsafePath,
)
from model_service.hub import (
    FAILURE_KINDS,
    BreakerState,
    HubClient,
    RemoteFile,
    RemoteManifest,
    SourceBreakers,
    SourceError,
    SourceHealth,
    SourceObserver,
    backoff_delay,
)
from model_service.metrics import ModelStoreMetrics
from model_service.paths import (
    remove_files_except,
    remove_path,
    safe_join,
    validate_relative_file,
    validate_revision,
)
from model_service.state import FileRecord, ModelState, atomic_write_bytes, fsync_dir
from model_service.store.progress import DownloadProgress, ProgressReporter
from model_service.store.registry import ModelRegistry, ModelView
from model_service.validator import check_file
from voxserve_common.errors import Internal, VoxserveError
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)


@dataclass
class PullTicket:
    """What pull() started or joined; ``job`` is None when the model was READY already."""

    model_id: str
    start_sequence: int
    job: DownloadJob | None
    joined: bool = False
    view: ModelView | None = None


@dataclass(frozen=True)
class _Plan:
    """What a job must fetch after looking at the disk."""

    files: tuple[FileRecord, ...]  # the manifest's files, sha256 filled where known
    to_fetch: tuple[RemoteFile, ...]
    present_bytes: int  # in files kept as they are
    resumable_bytes: int  # in partial files that will be resumed


@dataclass(frozen=True)
class PullRequest:
    """What a queued or paused pull asked for; persisted in queue.json across restarts."""

    model_id: str
    revision: str | None = None
    source: str | None = None  # a source name; None = every configured source

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "revision": self.revision, "source": self.source}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PullRequest:
        return cls(str(data["model_id"]), data.get("revision") or None, data.get("source") or None)


class QueueFile:
    """queue.json: the running and waiting pulls in order, and the paused ones, replaced
    atomically (temp, fsync, rename) like state.json on every change of the queue.

    ``graceful`` is true only in the file a graceful stop wrote: its queue is what the
    next start resumes. After a crash (kill -9) the queue is not resumed: the models are
    INCOMPLETE with their partial files, and the next pull continues them with Range.
    """

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[list[PullRequest], list[PullRequest], bool]:
        """(queued in order, paused, graceful); empty when missing or unreadable."""
        try:
            data = json.loads(self.path.read_text())
            queued = [PullRequest.from_json(item) for item in data.get("queue", [])]
            paused = [PullRequest.from_json(item) for item in data.get("paused", [])]
            graceful = data.get("graceful") is True
        except FileNotFoundError:
            return [], [], False
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.error("queue file unreadable; no download resumed", extra={"error": str(error)})
            return [], [], False
        return queued, paused, graceful

    def save(self, queued: list[PullRequest], paused: list[PullRequest], graceful: bool = False) -> None:
        payload = {
            "version": self.VERSION,
            "graceful": graceful,
            "queue": [r.to_json() for r in queued],
            "paused": [r.to_json() for r in paused],
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=1).encode())


class _SourceMetrics(SourceObserver):
    """voxserve_source_up / voxserve_source_failures_total from the breakers' reports."""

    def __init__(self, metrics: ModelStoreMetrics) -> None:
        self._metrics = metrics

    def failure(self, source: str, kind: str) -> None:
        self._metrics.source_failures.labels(source, kind).inc()

    def state_changed(self, source: str, state: BreakerState) -> None:
        self._metrics.source_up.labels(source).set(1 if state == BreakerState.CLOSED else 0)


class PullService:
    """Starts, joins and cancels downloads and runs them on the queue's worker threads.

    Every public method blocks (disk, and the queue's lock); call them from a worker
    thread, not the event loop.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        catalog: Catalog,
        hub: HubClient,
        config: ModelStoreConfig,
        metrics: ModelStoreMetrics,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.hub = hub
        self.config = config
        self.metrics = metrics
        for source in hub.sources:  # every series exists from the start, at zero
            for kind in FAILURE_KINDS:
                metrics.source_failures.labels(source.name, kind)
        self.breakers = SourceBreakers(
            hub.sources, config.breaker_failures, config.breaker_cooldown_seconds, _SourceMetrics(metrics)
        )
        self.fetcher = FileFetcher(
            hub, config.download_chunk_bytes, config.download_retries, self.RETRY_BACKOFF_SECONDS, self.breakers
        )
        self._queue_file = QueueFile(registry.data_dir / "queue.json")
        self._queue_file_lock = threading.Lock()
        self._queue_frozen = False  # set by stop(): what the queue held then is what resumes
        self._paused: dict[str, PullRequest] = {}  # under the registry lock
        self.queue = DownloadQueue(self._run_job, config.max_concurrent_downloads, on_change=self._queue_changed)

    # First retry after about this long, then doubling (with jitter): a hiccup costs little,
    # an outage is not hammered.
    RETRY_BACKOFF_SECONDS = 0.25

    # ----------------------------------------------------------------- requests

    def pull(self, model_id: str, revision: str | None = None, source: str | None = None) -> PullTicket:
        """Start, join or short-circuit a download.

        READY and intact (sizes on disk match) -> returns at once without the network.
        PAUSED -> resumed (queued at the end, with the revision and source it had unless
        others are given). ``source`` (a name or URL) restricts the download to that one
        endpoint. Raises ModelNotFound / InvalidModelId for bad ids, UnknownSource for a
        source that is not configured.
        """
        entry = self.catalog.get(model_id)
        if revision:
            validate_revision(revision)
        source_name = self.hub.find_source(source).name if source else None
        registry = self.registry
        with registry.locked():
            start_sequence = registry.bus.sequence
            active = self.queue.join(model_id)
            if active is not None:
                logger.info(
                    "pull joined a download in progress",
                    extra={"model_id": model_id, "job_id": active.job_id, "joiners": active.joiners},
                )
                return PullTicket(model_id, start_sequence, active, joined=True)
            record = registry.record(model_id)
            wanted = revision or entry.revision
            if record.state == ModelState.PAUSED:
                saved = self._paused.get(model_id, PullRequest(model_id))
                request = PullRequest(model_id, revision or saved.revision, source_name or saved.source)
                return self._enqueue(request, start_sequence, trust_sizes=False, message="resumed")
            if record.state == ModelState.READY and wanted in (record.revision, record.requested_revision, "local"):
                if all(check_file(registry.model_dir(model_id), f, deep=False).ok for f in record.files):
                    return PullTicket(model_id, start_sequence, None, view=registry.view(model_id))
                logger.warning("READY model has missing or resized files; repairing", extra={"model_id": model_id})
            elif record.state == ModelState.READY and revision is None:
                return PullTicket(model_id, start_sequence, None, view=registry.view(model_id))
            # Only a READY model's files are known good; after a failed verification, a
            # crash or an error, files on disk are re-hashed before they are kept.
            trust_sizes = record.state == ModelState.READY
            return self._enqueue(PullRequest(model_id, revision, source_name), start_sequence, trust_sizes, "queued")

    def _enqueue(self, request: PullRequest, start_sequence: int, trust_sizes: bool, message: str) -> PullTicket:
        """WAITING at the end of the queue. Call inside ``registry.locked()``."""
        model_id = request.model_id
        position = len(self.queue) + 1
        self._paused.pop(model_id, None)
        self.registry.transition(
            model_id, ModelState.WAITING, message=message, error="", queue_position=position, persist=False
        )
        job, joined = self.queue.submit(model_id, request.revision, trust_sizes=trust_sizes, source=request.source)
        logger.info(
            "download queued",
            extra={"model_id": model_id, "job_id": job.job_id, "queue_position": position, "source": request.source},
        )
        return PullTicket(model_id, start_sequence, job, joined=joined)

    def cancel(self, model_id: str, wait_seconds: float = 15.0) -> None:
        """Stop a running or waiting download and wait (up to ``wait_seconds``) for it to
        end; its partial files are removed (a PAUSED model's too). ModelNotReady when
        nothing downloads, waits or is paused."""
        self.catalog.get(model_id)
        job = self.queue.cancel(model_id)
        if job is None:
            with self.registry.locked():
                state = self.registry.record(model_id).state
                if state == ModelState.PAUSED and self.queue.active(model_id) is None:
                    self._paused.pop(model_id, None)
                    self._after_cancel(model_id)
                    self.registry.after_unlock(self._save_queue)
                    logger.info("paused download cancelled", extra={"model_id": model_id})
                    return
            raise ModelNotReady(f"nothing to cancel: {model_id} is {state.value}, not downloading, waiting or paused")
        if not job.running and job.started_at is None:
            self._after_cancel(model_id)
        job.done_event.wait(wait_seconds)
        logger.info("download cancelled", extra={"model_id": model_id, "job_id": job.job_id})

    def pause(self, model_id: str, wait_seconds: float = 15.0) -> None:
        """Stop a running download (waiting up to ``wait_seconds`` for it to stop) or take
        a waiting one out of the queue; its bytes stay on disk and the model is PAUSED.

        Raises ModelNotReady naming the state when nothing downloads or waits, ModelBusy
        while the files are being verified (a moment before READY).
        """
        self.catalog.get(model_id)
        registry = self.registry
        with registry.locked():
            state = registry.record(model_id).state
            job = self.queue.active(model_id)
            if job is None:
                raise ModelNotReady(f"cannot pause {model_id}: it is {state.value}, not downloading or waiting")
            if state == ModelState.VERIFYING:
                raise ModelBusy(f"cannot pause {model_id}: it is VERIFYING, READY in a moment")
        request = PullRequest(model_id, job.revision, job.source)
        paused = DownloadPaused(f"{model_id} paused; ResumeDownload continues it")
        stopped = self.queue.stop_job(model_id, StopReason.PAUSE, paused)
        if stopped is None:  # it ended meanwhile
            return
        if stopped.started_at is None:  # taken out of the queue before it ran
            with registry.locked():
                self._paused[model_id] = request
                registry.transition(model_id, ModelState.PAUSED, message=paused.args[0], error="")
            self._save_queue()
        stopped.done_event.wait(wait_seconds)
        logger.info("download paused", extra={"model_id": model_id, "job_id": stopped.job_id})

    def resume(self, model_id: str) -> None:
        """Queue a PAUSED model again, at the end of the queue; ModelNotReady (naming the
        state) for any other state."""
        self.catalog.get(model_id)
        with self.registry.locked():
            state = self.registry.record(model_id).state
            if state != ModelState.PAUSED or self.queue.active(model_id) is not None:
                raise ModelNotReady(f"cannot resume {model_id}: it is {state.value}, not PAUSED")
            request = self._paused.get(model_id, PullRequest(model_id))
            self._enqueue(request, self.registry.bus.sequence, trust_sizes=False, message="resumed")

    def restore_queue(self, resume: bool) -> None:
        """At start-up, after the records are loaded: remember what paused pulls asked
        for and, when ``resume``, queue again the pulls that ran or waited at the last
        shutdown, in their order."""
        queued, paused, graceful = self._queue_file.load()
        with self.registry.locked():
            records = self.registry.records()
            for request in paused:
                if request.model_id in records and records[request.model_id].state == ModelState.PAUSED:
                    self._paused[request.model_id] = request
        if not resume or not graceful:
            if queued:
                logger.info(
                    "downloads not resumed; the next pull continues them from their partial files",
                    extra={
                        "models": [r.model_id for r in queued],
                        "reason": "resume_downloads_on_start is off" if graceful else "the last stop was not graceful",
                    },
                )
            self._save_queue()
            return
        for request in queued:
            try:
                try:
                    self.pull(request.model_id, request.revision, request.source)
                except UnknownSource:
                    logger.warning(
                        "the source of a resumed download is no longer configured; using every source",
                        extra={"model_id": request.model_id, "source": request.source},
                    )
                    self.pull(request.model_id, request.revision)
            except VoxserveError as error:
                logger.warning("could not resume a download", extra={"model_id": request.model_id, "error": str(error)})
            else:
                logger.info("download resumed after restart", extra={"model_id": request.model_id})
        self._save_queue()

    def _save_queue(self) -> None:
        with self._queue_file_lock:
            if self._queue_frozen:
                return
            queued = [PullRequest(j.model_id, j.revision, j.source) for j in self.queue.jobs()]
            self._queue_file.save(queued, list(dict(self._paused).values()))

    def is_downloading(self, model_id: str) -> bool:
        return self.queue.active(model_id) is not None

    def stop(self) -> None:
        """Graceful stop: write the queue as it is now (resumed at the next start), then
        stop the jobs keeping their partial files and sidecars."""
        with self._queue_file_lock:
            queued = [PullRequest(j.model_id, j.revision, j.source) for j in self.queue.jobs()]
            self._queue_file.save(queued, list(dict(self._paused).values()), graceful=True)
            self._queue_frozen = True
        logger.info("download queue saved for the next start", extra={"models": [r.model_id for r in queued]})
        self.queue.stop()

    def forget_paused(self, model_id: str) -> None:
        """The model's files were deleted: nothing of a paused pull is left to resume."""
        with self.registry.locked():
            if self._paused.pop(model_id, None) is not None:
                self.registry.after_unlock(self._save_queue)

    def source_health(self) -> list[SourceHealth]:
        return self.breakers.health()

    def _after_cancel(self, model_id: str) -> None:
        remove_path(self.registry.partial_root(model_id))
        self.metrics.downloads_failed.labels(model_id, "", "cancelled").inc()
        with self.registry.locked():
            self.registry.transition(model_id, self._resting_state(model_id), message="download cancelled", error="")

    def _resting_state(self, model_id: str) -> ModelState:
        record = self.registry.record(model_id)
        model_dir = self.registry.model_dir(model_id)
        if record.files and all(check_file(model_dir, f, False).ok for f in record.files):
            return ModelState.READY
        if model_dir.is_dir() and any(p.is_file() for p in model_dir.rglob("*")):
            return ModelState.INCOMPLETE
        return ModelState.NOT_DOWNLOADED

    def _queue_changed(self) -> None:
        waiting = self.queue.waiting_ids()
        self.metrics.queue_length.set(len(waiting))
        with self.registry.locked():
            for index, model_id in enumerate(waiting, start=1):
                record = self.registry.record(model_id)
                if record.state == ModelState.WAITING and record.queue_position != index:
                    self.registry.transition(
                        model_id, ModelState.WAITING, message="queue moved", queue_position=index, persist=False
                    )
            self.registry.after_unlock(self._save_queue)

    # ----------------------------------------------------------------- one job

    def _run_job(self, job: DownloadJob) -> None:
        with log_context(model_id=job.model_id, job_id=job.job_id):
            entry = self.catalog.get(job.model_id)
            started = time.monotonic()
            try:
                source = self._download(job, entry, job.revision or entry.revision)
            except DownloadCancelled as error:
                self._after_stop(job, error)
                return
            except VoxserveError as error:
                self._fail(job, error)
                return
            except Exception as error:
                logger.exception("download crashed")
                message = f"download of {job.model_id} failed unexpectedly: {type(error).__name__}: {error}"
                self._fail(job, Internal(message))
                return
            finally:
                self.registry.set_progress(job.model_id, None)
                self.metrics.download_speed.labels(job.model_id).set(0)
            duration = time.monotonic() - started
            self.metrics.downloads_completed.labels(job.model_id, source).inc()
            self.metrics.download_duration.labels(job.model_id).observe(duration)
            logger.info(
                "model ready", extra={"model_id": job.model_id, "source": source, "seconds": round(duration, 3)}
            )
            job.finish(None)

    def _after_stop(self, job: DownloadJob, error: DownloadCancelled) -> None:
        """A job stopped by its cancel event: remove its partial files only for a cancel."""
        model_id = job.model_id
        if job.stop_reason == StopReason.PAUSE:
            paused = DownloadPaused(f"{model_id} paused; ResumeDownload continues it")
            with self.registry.locked():
                self._paused[model_id] = PullRequest(model_id, job.revision, job.source)
                self.registry.transition(model_id, ModelState.PAUSED, message=paused.args[0], error="")
            logger.info("download paused; partial files kept", extra={"model_id": model_id})
            job.finish(paused)
        elif job.stop_reason == StopReason.SHUTDOWN:
            # state.json says DOWNLOADING: the next start marks it INCOMPLETE and, from
            # queue.json, queues it again; the partial files and sidecars resume it.
            logger.info("download stopped by shutdown; partial files kept", extra={"model_id": model_id})
            job.finish(error)
        else:
            self._after_cancel(model_id)
            job.finish(error)

    def _fail(self, job: DownloadJob, error: VoxserveError) -> None:
        reason = type(error).__name__
        # No source label: a job can fail before any source answered.
        self.metrics.downloads_failed.labels(job.model_id, "", reason).inc()
        logger.error("download failed", extra={"model_id": job.model_id, "error": str(error), "reason": reason})
        self.registry.transition(job.model_id, ModelState.ERROR, message=str(error), error=str(error))
        job.finish(error)

    def _download(self, job: DownloadJob, entry: CatalogEntry, revision: str) -> str:
        """Run one job to READY and return the endpoint the last file came from."""
        model_id = entry.model_id
        self.registry.transition(
            model_id, ModelState.DOWNLOADING, message=f"resolving {entry.repo_id}@{revision}", persist=False
        )
        endpoints = [self.hub.find_source(job.source).url] if job.source else list(self.hub.endpoints)
        manifest = self._resolve_manifest(job, entry, revision, endpoints)
        old_files = {f.path: f for f in self.registry.record(model_id).files}
        files = _manifest_records(manifest, entry, old_files)
        self.registry.transition(
            model_id,
            ModelState.DOWNLOADING,
            message=f"downloading {len(files)} files from {manifest.endpoint}",
            revision=manifest.commit,
            requested_revision=revision,
            files=files,
            source=manifest.endpoint,
        )
        plan = self._plan(job, entry, manifest, files, old_files)
        needed = sum(r.size for r in plan.to_fetch) - plan.resumable_bytes
        available = shutil.disk_usage(self.registry.data_dir).free - self.config.disk_reserve_bytes
        if needed > available:
            raise InsufficientDisk(model_id, needed, max(0, available))
        progress = DownloadProgress(
            manifest.total_bytes,
            plan.present_bytes + plan.resumable_bytes,
            len(manifest.files),
            len(manifest.files) - len(plan.to_fetch),
            source=manifest.endpoint,
        )
        self.registry.set_progress(model_id, progress)
        self.metrics.downloads_started.labels(model_id, manifest.endpoint).inc()
        reporter = ProgressReporter(model_id, progress, self.registry.bus, self.metrics)
        source, fetched = self._fetch_all(job, manifest, plan, reporter, endpoints)
        final = tuple(replace(f, sha256=fetched.get(f.path, f.sha256)) for f in plan.files)
        return self._finish(model_id, final, source or manifest.endpoint)

    def _resolve_manifest(
        self, job: DownloadJob, entry: CatalogEntry, revision: str, endpoints: list[str]
    ) -> RemoteManifest:
        """The manifest from the first of ``endpoints`` that answers; an endpoint whose
        circuit is open is skipped, transient errors are retried with backoff."""
        reasons: list[str] = []
        not_found = 0
        for endpoint in endpoints:
            try:
                manifest = self._manifest_from(job, endpoint, entry, revision)
            except SourceError as error:
                reasons.append(f"{endpoint}: {error.reason}")
                not_found += error.not_found
                logger.warning(
                    "hub source failed; trying the next", extra={"endpoint": endpoint, "reason": error.reason}
                )
                continue
            logger.info(
                "source chosen", extra={"endpoint": endpoint, "commit": manifest.commit, "files": len(manifest.files)}
            )
            return manifest
        message = f"every hub source failed for {entry.model_id} ({entry.repo_id}@{revision}): " + "; ".join(reasons)
        if not_found == len(endpoints):
            raise RemoteNotFound(message)
        raise SourcesFailed(message)

    def _manifest_from(self, job: DownloadJob, endpoint: str, entry: CatalogEntry, revision: str) -> RemoteManifest:
        attempt = 0
        while True:
            attempt += 1
            refused = self.breakers.allow(endpoint)
            if refused:
                raise SourceError(endpoint, refused)
            try:
                manifest = self.hub.manifest(endpoint, entry, revision)
            except SourceError as error:
                if error.not_found:
                    raise
                self.breakers.failure(endpoint, error.kind, error.reason)
                if not error.transient or attempt >= self.config.download_retries:
                    raise
                delay = backoff_delay(attempt, self.RETRY_BACKOFF_SECONDS)
                logger.info(
                    "hub source failed; retrying",
                    extra={"endpoint": endpoint, "reason": error.reason, "attempt": attempt, "delay": round(delay, 3)},
                )
                if job.cancel_event.wait(delay):
                    raise DownloadCancelled(f"download of {entry.model_id} cancelled") from error
                continue
            self.breakers.success(endpoint)
            return manifest

    def _plan(
        self,
        job: DownloadJob,
        entry: CatalogEntry,
        manifest: RemoteManifest,
        files: tuple[FileRecord, ...],
        old_files: dict[str, FileRecord],
    ) -> _Plan:
        """Keep files on disk that pass their check (a size check for a READY model's
        unchanged files, a re-hash otherwise); remove bad ones; count resumable partials."""
        model_dir = self.registry.model_dir(entry.model_id)
        model_dir.mkdir(parents=True, exist_ok=True)
        kept: list[FileRecord] = []
        to_fetch: list[RemoteFile] = []
        present = 0
        for remote, record in zip(manifest.files, files, strict=True):
            old = old_files.get(remote.path)
            trusted = job.trust_sizes and old is not None and _same_blob(old, remote)
            expected = replace(record, sha256=old.sha256) if trusted and old is not None else record
            check = check_file(model_dir, expected, deep=not trusted, cancel=job.cancel_event)
            if check.ok:
                present += remote.size
                kept.append(replace(record, sha256=check.actual_sha256 or record.sha256))
                continue
            kept.append(record)
            if check.problem != "missing":
                logger.warning(
                    "existing file is bad; fetching it again", extra={"file": remote.path, "problem": check.problem}
                )
                safe_join(model_dir, remote.path).unlink(missing_ok=True)
            to_fetch.append(remote)
        partial_root = self.registry.partial_root(entry.model_id)
        resumable = 0
        for remote in to_fetch:
            partial = PartialFile.for_target(partial_root, Path(validate_relative_file(remote.path)))
            resumable += partial.resumable_bytes(partial.describe(entry.repo_id, manifest.commit, remote))
        return _Plan(tuple(kept), tuple(to_fetch), present, resumable)

    def _fetch_all(
        self, job: DownloadJob, manifest: RemoteManifest, plan: _Plan, reporter: ProgressReporter, allowed: list[str]
    ) -> tuple[str, dict[str, str]]:
        """Fetch and move in each missing file; returns the last source and each file's sha256."""
        model_id = job.model_id
        model_dir = self.registry.model_dir(model_id)
        partial_root = self.registry.partial_root(model_id)
        endpoints = [manifest.endpoint, *[e for e in allowed if e != manifest.endpoint]]
        source = ""
        sha256: dict[str, str] = {}
        for remote in plan.to_fetch:
            partial = PartialFile.for_target(partial_root, Path(validate_relative_file(remote.path)))
            logger.info("file started", extra={"file": remote.path, "size": remote.size})
            reporter.start_file(remote.path)
            result = self.fetcher.fetch(
                repo_id=manifest.repo_id,
                commit=manifest.commit,
                remote=remote,
                partial=partial,
                endpoints=endpoints,
                cancel=job.cancel_event,
                on_bytes=reporter.on_bytes,
                on_source_failed=reporter.on_source_failed,
                on_verify_failed=reporter.on_verify_failed,
            )
            source = result.source
            _move_into_place(partial, model_dir, remote.path)
            sha256[remote.path] = result.sha256
            reporter.file_done()
            logger.info(
                "file finished",
                extra={
                    "file": remote.path,
                    "bytes_fetched": result.bytes_fetched,
                    "resumed_from": result.resumed_from,
                    "endpoint": result.source,
                },
            )
        return source, sha256

    def _finish(self, model_id: str, files: tuple[FileRecord, ...], source: str) -> str:
        registry = self.registry
        registry.transition(model_id, ModelState.VERIFYING, message="checking files", files=files, source=source)
        model_dir = registry.model_dir(model_id)
        bad = [c for c in (check_file(model_dir, f, deep=False) for f in files) if not c.ok]
        if bad:
            for _ in bad:
                self.metrics.verification_failures.labels(model_id).inc()
            raise IntegrityError(f"{model_id} failed verification: " + "; ".join(f"{c.path}: {c.problem}" for c in bad))
        remove_path(registry.partial_root(model_id))
        remove_files_except(model_dir, {f.path for f in files})
        registry.transition(model_id, ModelState.READY, message=f"ready from {source}", source=source, error="")
        logger.info("verification passed", extra={"files": len(files)})
        return source


def _manifest_records(
    manifest: RemoteManifest, entry: CatalogEntry, old_files: dict[str, FileRecord]
) -> tuple[FileRecord, ...]:
    """The manifest as records; a non-LFS file keeps the sha256 computed at an earlier
    download of the same blob (the hub only gives its git oid)."""
    required = set(entry.required_files)
    records = []
    for f in manifest.files:
        sha256 = f.sha256
        old = old_files.get(f.path)
        if old and not sha256 and old.size == f.size and old.git_oid == f.git_oid:
            sha256 = old.sha256
        records.append(FileRecord(f.path, f.size, sha256, f.git_oid, f.path in required))
    return tuple(records)


def _same_blob(old: FileRecord, remote: RemoteFile) -> bool:
    """The recorded file is the remote one (same size and hash) and its sha256 is known."""
    same_hash = old.sha256 == remote.sha256 or (not remote.sha256 and old.git_oid == remote.git_oid)
    return old.size == remote.size and same_hash and bool(old.sha256)


def _move_into_place(partial: PartialFile, model_dir: Path, relative: str) -> None:
    target = safe_join(model_dir, relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.is_symlink() or not target.parent.resolve().is_relative_to(model_dir.resolve()):
        raise UnsafePath(f"refusing to write {relative}: its directory leaves {model_dir}")
    os.replace(partial.part, target)
    fsync_dir(target.parent)
    partial.remove()
