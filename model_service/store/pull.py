"""PullModel and CancelDownload: the download queue and the pipeline one job runs.

A job: resolve the manifest (endpoint chain) -> plan (keep files already good, resume
partials) -> check the disk -> fetch each missing file into partial/ -> move it into
models/ -> check sizes -> READY. Every state change goes through the registry.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.download_queue import DownloadJob, DownloadQueue
from model_service.downloader import FileFetcher, PartialFile
from model_service.errors import (
    DownloadCancelled,
    InsufficientDisk,
    IntegrityError,
    ModelNotReady,
    RemoteNotFound,
    SourcesFailed,
    UnsafePath,
)
from model_service.hub import HubClient, RemoteFile, RemoteManifest, SourceError
from model_service.metrics import ModelStoreMetrics
from model_service.paths import (
    remove_files_except,
    remove_path,
    safe_join,
    validate_relative_file,
    validate_revision,
)
from model_service.state import FileRecord, ModelState, fsync_dir
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
        self.fetcher = FileFetcher(hub, config.download_chunk_bytes, config.download_retries)
        self.queue = DownloadQueue(self._run_job, config.max_concurrent_downloads, on_change=self._queue_changed)

    # ----------------------------------------------------------------- requests

    def pull(self, model_id: str, revision: str | None = None) -> PullTicket:
        """Start, join or short-circuit a download.

        READY and intact (sizes on disk match) -> returns at once without the network.
        Raises ModelNotFound / InvalidModelId for bad ids.
        """
        entry = self.catalog.get(model_id)
        if revision:
            validate_revision(revision)
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
            if record.state == ModelState.READY and wanted in (record.revision, record.requested_revision, "local"):
                if all(check_file(registry.model_dir(model_id), f, deep=False).ok for f in record.files):
                    return PullTicket(model_id, start_sequence, None, view=registry.view(model_id))
                logger.warning("READY model has missing or resized files; repairing", extra={"model_id": model_id})
            elif record.state == ModelState.READY and revision is None:
                return PullTicket(model_id, start_sequence, None, view=registry.view(model_id))
            # Only a READY model's files are known good; after a failed verification, a
            # crash or an error, files on disk are re-hashed before they are kept.
            trust_sizes = record.state == ModelState.READY
            position = len(self.queue) + 1
            registry.transition(
                model_id, ModelState.WAITING, message="queued", error="", queue_position=position, persist=False
            )
            job, joined = self.queue.submit(model_id, revision, trust_sizes=trust_sizes)
        logger.info("download queued", extra={"model_id": model_id, "job_id": job.job_id, "queue_position": position})
        return PullTicket(model_id, start_sequence, job, joined=joined)

    def cancel(self, model_id: str, wait_seconds: float = 15.0) -> None:
        """Stop a running or waiting download and wait (up to ``wait_seconds``) for it to
        end; its partial files are removed. ModelNotReady when nothing downloads."""
        self.catalog.get(model_id)
        job = self.queue.cancel(model_id)
        if job is None:
            state = self.registry.record(model_id).state
            raise ModelNotReady(f"nothing to cancel: {model_id} is {state.value}, not downloading or waiting")
        if not job.running and job.started_at is None:
            self._after_cancel(model_id)
        job.done_event.wait(wait_seconds)
        logger.info("download cancelled", extra={"model_id": model_id, "job_id": job.job_id})

    def is_downloading(self, model_id: str) -> bool:
        return self.queue.active(model_id) is not None

    def stop(self) -> None:
        self.queue.stop()

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

    # ----------------------------------------------------------------- one job

    def _run_job(self, job: DownloadJob) -> None:
        with log_context(model_id=job.model_id, job_id=job.job_id):
            entry = self.catalog.get(job.model_id)
            started = time.monotonic()
            try:
                source = self._download(job, entry, job.revision or entry.revision)
            except DownloadCancelled as error:
                self._after_cancel(job.model_id)
                job.finish(error)
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
        manifest = self._resolve_manifest(entry, revision)
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
        source, fetched = self._fetch_all(job, manifest, plan, reporter)
        final = tuple(replace(f, sha256=fetched.get(f.path, f.sha256)) for f in plan.files)
        return self._finish(model_id, final, source or manifest.endpoint)

    def _resolve_manifest(self, entry: CatalogEntry, revision: str) -> RemoteManifest:
        reasons: list[str] = []
        not_found = 0
        for endpoint in self.hub.endpoints:
            try:
                manifest = self.hub.manifest(endpoint, entry, revision)
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
        if not_found == len(self.hub.endpoints):
            raise RemoteNotFound(message)
        raise SourcesFailed(message)

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
        self, job: DownloadJob, manifest: RemoteManifest, plan: _Plan, reporter: ProgressReporter
    ) -> tuple[str, dict[str, str]]:
        """Fetch and move in each missing file; returns the last source and each file's sha256."""
        model_id = job.model_id
        model_dir = self.registry.model_dir(model_id)
        partial_root = self.registry.partial_root(model_id)
        endpoints = [manifest.endpoint, *[e for e in self.hub.endpoints if e != manifest.endpoint]]
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
