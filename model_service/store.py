"""ModelStore: the domain behind the ModelStore RPCs (no grpc here).

Owns the records, the download queue, the event bus and the directories:

    data_dir/state.json          every model's record, replaced atomically
    data_dir/models/<id>/...     verified files only (moved in after their hash checks)
    data_dir/partial/<id>/...    <file>.part + <file>.part.json while downloading (resumable)
    data_dir/staging/...         imports being copied
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.downloader import DownloadJob, DownloadQueue, FileFetcher, PartialFile
from model_service.errors import (
    DownloadCancelled,
    ImportFailed,
    InsufficientDisk,
    IntegrityError,
    ModelBusy,
    ModelNotReady,
    RemoteNotFound,
    SourcesFailed,
    UnsafePath,
)
from model_service.events import EventBus, EventType, StoreEvent
from model_service.hub import HubClient, RemoteManifest, SourceError
from model_service.metrics import ModelStoreMetrics
from model_service.paths import safe_join, validate_relative_file, validate_revision
from model_service.state import BUSY_STATES, FileRecord, ModelRecord, ModelState, StateFile, fsync_dir
from model_service.validator import FileCheck, FileHasher, check_file
from voxserve_common.errors import Internal, InvalidArgument, VoxserveError
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)

# gRPC clients refuse messages over 4 MiB by default; a chunk leaves room for its path,
# hashes and framing so FetchModelFiles works with a default channel at any chunk_size.
MAX_FETCH_CHUNK = (4 << 20) - (64 << 10)


@dataclass(frozen=True)
class FileView:
    path: str
    size: int
    sha256: str
    required: bool
    present: bool


@dataclass(frozen=True)
class ModelView:
    """An immutable copy of one model's state for the edge to encode."""

    model_id: str
    kind: str
    repo_id: str
    revision: str
    requested_revision: str
    state: ModelState
    size_bytes: int
    local_path: str
    files: tuple[FileView, ...]
    source: str
    error: str
    updated_at: float
    bytes_on_disk: int
    queue_position: int
    description: str


@dataclass
class PullTicket:
    """What pull() started or joined; ``job`` is None when the model was READY already."""

    model_id: str
    start_sequence: int
    job: DownloadJob | None
    joined: bool = False
    view: ModelView | None = None


@dataclass(frozen=True)
class VerifyResult:
    model: ModelView
    ok: bool
    files: tuple[FileCheck, ...]
    seconds: float


@dataclass(frozen=True)
class FileChunkData:
    path: str
    offset: int
    data: bytes
    file_size: int
    sha256: str
    revision: str
    file_index: int
    files_total: int


@dataclass
class _Progress:
    """Byte counts and a sliding-window speed for one running download."""

    bytes_total: int
    bytes_done: int
    files_total: int
    files_done: int = 0
    current_file: str = ""
    source: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)
    last_published: float = 0.0

    def add(self, count: int) -> None:
        self.bytes_done += count
        now = time.monotonic()
        self.samples.append((now, self.bytes_done))
        cutoff = now - 3.0
        while len(self.samples) > 2 and self.samples[0][0] < cutoff:
            self.samples.pop(0)

    @property
    def speed(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0

    @property
    def eta(self) -> float:
        speed = self.speed
        return (self.bytes_total - self.bytes_done) / speed if speed > 0 else 0.0


class ModelStore:
    """Downloads, imports, verifies, deletes and streams models; publishes every change."""

    def __init__(
        self,
        config: ModelStoreConfig,
        catalog: Catalog,
        hub: HubClient,
        metrics: ModelStoreMetrics | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.hub = hub
        self.metrics = metrics or ModelStoreMetrics()
        self.data_dir = config.data_dir.resolve()
        self.models_dir = self.data_dir / "models"
        self.partial_dir = self.data_dir / "partial"
        self.staging_dir = self.data_dir / "staging"
        for directory in (self.data_dir, self.models_dir, self.partial_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._state_file = StateFile(self.data_dir / "state.json")
        self._lock = threading.RLock()
        self._records: dict[str, ModelRecord] = {}
        self._readers: dict[str, int] = {}
        self._progress: dict[str, _Progress] = {}
        self._positions: dict[str, int] = {}
        self.bus = EventBus(
            config.event_history, 1.0 / config.progress_events_per_second, first_sequence=int(time.time() * 1000)
        )
        self.fetcher = FileFetcher(hub, config.download_chunk_bytes, config.download_retries)
        self.scan_done = threading.Event()
        self._closed = False
        self.queue = DownloadQueue(self._run_job, config.max_concurrent_downloads, on_change=self._queue_changed)
        self._scan_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Load state.json at once; reconcile with the disk in a background thread."""
        loaded = self._state_file.load()
        with self._lock:
            interrupted = False
            for entry in self.catalog:
                record = loaded.get(entry.model_id) or ModelRecord(entry.model_id, requested_revision=entry.revision)
                if record.state in BUSY_STATES:
                    record.state = ModelState.INCOMPLETE
                    interrupted = True
                record.queue_position = 0
                self._records[entry.model_id] = record
            if interrupted:  # a download died with the last process; state.json must not say it runs
                self._state_file.save(self._records)
        self._scan_thread = threading.Thread(target=self._startup_scan, name="startup-scan", daemon=True)
        self._scan_thread.start()

    def close(self) -> None:
        self._closed = True
        self.queue.stop()
        if self._scan_thread is not None:
            self._scan_thread.join(5)

    def _startup_scan(self) -> None:
        started = time.monotonic()
        try:
            self._clean_orphans()
            for model_id in list(self._records):
                try:
                    self._reconcile(model_id, deep=self.config.verify_on_startup)
                except Exception:
                    logger.exception("startup scan failed for a model", extra={"model_id": model_id})
            if self.config.import_embedded:
                self._import_embedded_defaults()
        finally:
            self.scan_done.set()
            self._refresh_gauges()
            logger.info("startup scan finished", extra={"seconds": round(time.monotonic() - started, 3)})

    def _reconcile(self, model_id: str, deep: bool) -> None:
        """Set READY / INCOMPLETE / NOT_DOWNLOADED from what is really on disk."""
        with self._lock:
            record = self._records[model_id]
            if record.state in BUSY_STATES:
                return
            files = list(record.files)
        model_dir = self.models_dir / model_id
        has_partials = (self.partial_dir / model_id).exists()
        if not files:
            present = model_dir.is_dir() and any(p.is_file() for p in model_dir.rglob("*"))
            new_state = ModelState.INCOMPLETE if present or has_partials else ModelState.NOT_DOWNLOADED
        else:
            checks = [check_file(model_dir, f, deep) for f in files]
            if all(c.ok for c in checks):
                new_state = ModelState.READY
            elif any(c.ok for c in checks) or has_partials:
                new_state = ModelState.INCOMPLETE
            else:
                new_state = ModelState.NOT_DOWNLOADED
            for check in checks:
                if not check.ok:
                    logger.warning(
                        "file failed start-up check",
                        extra={"model_id": model_id, "file": check.path, "problem": check.problem},
                    )
        with self._lock:
            record = self._records[model_id]
            if record.state in BUSY_STATES:
                return
            if record.state != new_state:
                error = record.error if new_state == ModelState.ERROR else ""
                self._set_state(model_id, new_state, message="start-up disk scan", error=error)

    def _clean_orphans(self) -> None:
        """Remove partial files nobody can resume: unknown models, no sidecar, stale temp."""
        for child in self.partial_dir.iterdir() if self.partial_dir.exists() else []:
            if child.name not in self._records or not child.is_dir():
                logger.info("removing orphaned partial download", extra={"path": str(child)})
                _remove_path(child)
                continue
            for part in list(child.rglob("*")):
                if part.is_symlink():
                    part.unlink()
                elif part.name.endswith(".part") and not part.with_name(part.name + ".json").exists():
                    logger.info("removing partial file without sidecar", extra={"path": str(part)})
                    part.unlink()
                elif part.name.endswith(".part.json") and not part.with_name(part.name[: -len(".json")]).exists():
                    part.unlink()
            for directory in sorted((p for p in child.rglob("*") if p.is_dir()), reverse=True):
                if not any(directory.iterdir()):
                    directory.rmdir()
            if not any(child.iterdir()):
                child.rmdir()  # nothing resumable left: the model must not look INCOMPLETE
        for child in self.staging_dir.iterdir():
            _remove_path(child)
        for stray in self.data_dir.rglob("*.incomplete"):
            stray.unlink(missing_ok=True)

    def _import_embedded_defaults(self) -> None:
        for entry in self.catalog:
            if not entry.embedded_files:
                continue
            with self._lock:
                state = self._records[entry.model_id].state
            if state == ModelState.READY:
                continue
            try:
                self.import_model(entry.model_id, "")
            except VoxserveError as error:
                logger.warning("embedded import failed", extra={"model_id": entry.model_id, "error": str(error)})

    # ----------------------------------------------------------------- reads

    def list_models(self, kind: str | None = None) -> list[ModelView]:
        with self._lock:
            views = [self._view(entry.model_id) for entry in self.catalog if kind is None or entry.kind == kind]
        self._refresh_gauges()
        return views

    def get_model(self, model_id: str) -> ModelView:
        self.catalog.get(model_id)
        with self._lock:
            return self._view(model_id)

    def snapshot(self, model_ids: set[str] | None = None) -> tuple[list[ModelView], int]:
        """Every model's view and the sequence it corresponds to, taken atomically."""
        with self._lock:
            views = [self._view(e.model_id) for e in self.catalog if not model_ids or e.model_id in model_ids]
            return views, self.bus.sequence

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    # ----------------------------------------------------------------- pull

    def pull(self, model_id: str, revision: str | None = None) -> PullTicket:
        """Start, join or short-circuit a download.

        READY and intact (sizes on disk match) -> returns at once without the network.
        Raises ModelNotFound / InvalidModelId for bad ids.
        """
        entry = self.catalog.get(model_id)
        if revision:
            validate_revision(revision)
        with self._lock:
            start_sequence = self.bus.sequence
            active = self.queue.active(model_id)
            if active is not None:
                active.joiners += 1
                logger.info("pull joined a download in progress", extra={"model_id": model_id, "job_id": active.job_id})
                return PullTicket(model_id, start_sequence, active, joined=True)
            record = self._records[model_id]
            wanted = revision or entry.revision
            if record.state == ModelState.READY and wanted in (record.revision, record.requested_revision, "local"):
                if all(check_file(self.model_dir(model_id), f, deep=False).ok for f in record.files):
                    return PullTicket(model_id, start_sequence, None, view=self._view(model_id))
                logger.warning("READY model has missing or resized files; repairing", extra={"model_id": model_id})
            elif record.state == ModelState.READY and revision is None:
                return PullTicket(model_id, start_sequence, None, view=self._view(model_id))
            # Only a READY model's files are known good; after a failed verification, a
            # crash or an error, files on disk are re-hashed before they are kept.
            trust_sizes = record.state == ModelState.READY
            position = len(self.queue) + 1
            self._positions[model_id] = position
            self._set_state(
                model_id, ModelState.WAITING, message="queued", error="", queue_position=position, persist=False
            )
            job, joined = self.queue.submit(model_id, revision, trust_sizes=trust_sizes)
            logger.info(
                "download queued", extra={"model_id": model_id, "job_id": job.job_id, "queue_position": position}
            )
            return PullTicket(model_id, start_sequence, job, joined=joined)

    def cancel(self, model_id: str, wait_seconds: float = 15.0) -> ModelView:
        """Stop a running or waiting download; its partial files are removed."""
        self.catalog.get(model_id)
        job = self.queue.cancel(model_id)
        if job is None:
            with self._lock:
                state = self._records[model_id].state
            raise ModelNotReady(f"nothing to cancel: {model_id} is {state.value}, not downloading or waiting")
        if not job.running and job.started_at is None:
            self._after_cancel(model_id)
        job.done_event.wait(wait_seconds)
        logger.info("download cancelled", extra={"model_id": model_id, "job_id": job.job_id})
        return self.get_model(model_id)

    def _after_cancel(self, model_id: str) -> None:
        _remove_path(self.partial_dir / model_id)
        self.metrics.downloads_failed.labels(model_id, "", "cancelled").inc()
        with self._lock:
            self._set_state(model_id, self._resting_state(model_id), message="download cancelled", error="")

    def _resting_state(self, model_id: str) -> ModelState:
        record = self._records[model_id]
        model_dir = self.model_dir(model_id)
        if record.files and all(check_file(model_dir, f, False).ok for f in record.files):
            return ModelState.READY
        if model_dir.is_dir() and any(p.is_file() for p in model_dir.rglob("*")):
            return ModelState.INCOMPLETE
        return ModelState.NOT_DOWNLOADED

    # ----------------------------------------------------------------- the download job

    def _run_job(self, job: DownloadJob) -> None:
        with log_context(model_id=job.model_id, job_id=job.job_id):
            entry = self.catalog.get(job.model_id)
            revision = job.revision or entry.revision
            started = time.monotonic()
            source = ""
            try:
                source = self._download(job, entry, revision)
            except DownloadCancelled as error:
                self._after_cancel(job.model_id)
                job.finish(error)
                return
            except VoxserveError as error:
                self._fail(job, error, source)
                return
            except Exception as error:
                logger.exception("download crashed")
                self._fail(
                    job,
                    Internal(f"download of {job.model_id} failed unexpectedly: {type(error).__name__}: {error}"),
                    source,
                )
                return
            finally:
                with self._lock:
                    self._progress.pop(job.model_id, None)
                self.metrics.download_speed.labels(job.model_id).set(0)
            duration = time.monotonic() - started
            self.metrics.downloads_completed.labels(job.model_id, source).inc()
            self.metrics.download_duration.labels(job.model_id).observe(duration)
            logger.info(
                "model ready", extra={"model_id": job.model_id, "source": source, "seconds": round(duration, 3)}
            )
            job.finish(None)

    def _fail(self, job: DownloadJob, error: VoxserveError, source: str) -> None:
        reason = type(error).__name__
        self.metrics.downloads_failed.labels(job.model_id, source, reason).inc()
        logger.error("download failed", extra={"model_id": job.model_id, "error": str(error), "reason": reason})
        with self._lock:
            self._set_state(job.model_id, ModelState.ERROR, message=str(error), error=str(error))
        job.finish(error)

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

    def _download(self, job: DownloadJob, entry: CatalogEntry, revision: str) -> str:
        model_id = entry.model_id
        with self._lock:
            self._positions.pop(model_id, None)
            self._set_state(
                model_id,
                ModelState.DOWNLOADING,
                message=f"resolving {entry.repo_id}@{revision}",
                queue_position=0,
                persist=False,
            )
        manifest = self._resolve_manifest(entry, revision)
        required = set(entry.required_files)
        old_records = {f.path: f for f in self._records[model_id].files}
        new_files = [FileRecord(f.path, f.size, f.sha256, f.git_oid, f.path in required) for f in manifest.files]
        for file in new_files:
            old = old_records.get(file.path)
            if old and not file.sha256 and old.size == file.size and old.git_oid == file.git_oid:
                file.sha256 = old.sha256  # sha256 computed at an earlier download of the same blob
        with self._lock:
            self._set_state(
                model_id,
                ModelState.DOWNLOADING,
                message=f"downloading {len(new_files)} files from {manifest.endpoint}",
                revision=manifest.commit,
                requested_revision=revision,
                files=new_files,
                source=manifest.endpoint,
            )
        model_dir = self.model_dir(model_id)
        model_dir.mkdir(parents=True, exist_ok=True)
        partial_root = self.partial_dir / model_id
        to_fetch = []
        present_bytes = 0
        for remote, record in zip(manifest.files, new_files, strict=True):
            old = old_records.get(remote.path)
            trusted = (
                job.trust_sizes
                and old is not None
                and old.size == remote.size
                and (old.sha256 == remote.sha256 or (not remote.sha256 and old.git_oid == remote.git_oid))
                and old.sha256
            )
            check = check_file(
                model_dir,
                record if not trusted else replace(record, sha256=old.sha256 if old else ""),
                deep=not trusted,
                cancel=job.cancel_event,
            )
            if check.ok:
                present_bytes += remote.size
                if check.actual_sha256:
                    record.sha256 = check.actual_sha256
                continue
            if check.problem != "missing":
                logger.warning(
                    "existing file is bad; fetching it again", extra={"file": remote.path, "problem": check.problem}
                )
                safe_join(model_dir, remote.path).unlink(missing_ok=True)
            to_fetch.append(remote)
        resumable = 0
        for remote in to_fetch:
            partial = PartialFile.for_target(partial_root, Path(validate_relative_file(remote.path)))
            resumable += partial.resumable_bytes(partial.describe(entry.repo_id, manifest.commit, remote))
        needed = sum(r.size for r in to_fetch) - resumable
        available = shutil.disk_usage(self.data_dir).free - self.config.disk_reserve_bytes
        if needed > available:
            raise InsufficientDisk(model_id, needed, max(0, available))
        endpoints = [manifest.endpoint, *[e for e in self.hub.endpoints if e != manifest.endpoint]]
        progress = _Progress(
            manifest.total_bytes,
            present_bytes + resumable,
            len(manifest.files),
            len(manifest.files) - len(to_fetch),
            source=manifest.endpoint,
        )
        with self._lock:
            self._progress[model_id] = progress
        self.metrics.downloads_started.labels(model_id, manifest.endpoint).inc()
        source = manifest.endpoint
        bytes_counter: dict[str, Any] = {}

        def on_bytes(count: int, endpoint: str) -> None:
            progress.add(count)
            progress.source = endpoint
            if count > 0:
                counter = bytes_counter.get(endpoint)
                if counter is None:
                    counter = bytes_counter[endpoint] = self.metrics.download_bytes.labels(model_id, endpoint)
                counter.inc(count)
            self._publish_progress(model_id, progress)

        def on_source_failed(endpoint: str, reason: str) -> None:
            logger.warning(
                "source failed for a file; falling back",
                extra={"endpoint": endpoint, "reason": reason, "file": progress.current_file},
            )

        def on_verify_failed(reason: str) -> None:
            self.metrics.verification_failures.labels(model_id).inc()
            logger.error("verification failed", extra={"problem": reason})

        for remote in to_fetch:
            relative = Path(validate_relative_file(remote.path))
            partial = PartialFile.for_target(partial_root, relative)
            progress.current_file = remote.path
            logger.info("file started", extra={"file": remote.path, "size": remote.size})
            self._publish_progress(model_id, progress, force=True)
            result = self.fetcher.fetch(
                repo_id=entry.repo_id,
                commit=manifest.commit,
                remote=remote,
                partial=partial,
                endpoints=endpoints,
                cancel=job.cancel_event,
                on_bytes=on_bytes,
                on_source_failed=on_source_failed,
                on_verify_failed=on_verify_failed,
            )
            source = result.source
            target = safe_join(model_dir, remote.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.parent.is_symlink() or not target.parent.resolve().is_relative_to(model_dir.resolve()):
                raise UnsafePath(f"refusing to write {remote.path}: its directory leaves {model_dir}")
            os.replace(partial.part, target)
            fsync_dir(target.parent)
            partial.remove()
            for record in new_files:
                if record.path == remote.path:
                    record.sha256 = result.sha256
            progress.files_done += 1
            logger.info(
                "file finished",
                extra={
                    "file": remote.path,
                    "bytes_fetched": result.bytes_fetched,
                    "resumed_from": result.resumed_from,
                    "endpoint": result.source,
                },
            )
        with self._lock:
            self._set_state(model_id, ModelState.VERIFYING, message="checking files", files=new_files, source=source)
        checks = [check_file(model_dir, f, deep=False) for f in new_files]
        bad = [c for c in checks if not c.ok]
        if bad:
            for _ in bad:
                self.metrics.verification_failures.labels(model_id).inc()
            raise IntegrityError(f"{model_id} failed verification: " + "; ".join(f"{c.path}: {c.problem}" for c in bad))
        _remove_path(partial_root)
        self._remove_extra_files(model_dir, {f.path for f in new_files})
        with self._lock:
            self._set_state(model_id, ModelState.READY, message=f"ready from {source}", source=source, error="")
        logger.info("verification passed", extra={"files": len(new_files)})
        return source

    def _remove_extra_files(self, model_dir: Path, keep: set[str]) -> None:
        for path in sorted(model_dir.rglob("*"), reverse=True):
            relative = path.relative_to(model_dir).as_posix()
            if path.is_file() and relative not in keep:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    def _publish_progress(self, model_id: str, progress: _Progress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - progress.last_published < self.bus.progress_interval:
            return  # the bus would drop it anyway; skip building it (called per network read)
        progress.last_published = now
        speed = progress.speed
        self.metrics.download_speed.labels(model_id).set(speed)
        event = StoreEvent(
            0,
            model_id,
            EventType.PROGRESS,
            ModelState.DOWNLOADING,
            time.time(),
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            bytes_per_second=speed,
            eta_seconds=progress.eta,
            files_done=progress.files_done,
            files_total=progress.files_total,
            current_file=progress.current_file,
            source=progress.source,
        )
        if force:
            self.bus.allow_next_progress(model_id)
        self.bus.publish(event)

    # ----------------------------------------------------------------- delete / verify / import

    def delete(self, model_id: str) -> ModelView:
        """Remove a model's files; ModelBusy while it downloads or is being fetched."""
        self.catalog.get(model_id)
        with self._lock:
            record = self._records[model_id]
            if record.state in BUSY_STATES or self.queue.active(model_id) is not None:
                raise ModelBusy(f"{model_id} is {record.state.value}; cancel the download first (CancelDownload)")
            if self._readers.get(model_id):
                raise ModelBusy(
                    f"{model_id} is being copied by {self._readers[model_id]} FetchModelFiles stream(s); retry when they end"
                )
            _remove_path(self.model_dir(model_id))
            _remove_path(self.partial_dir / model_id)
            self._set_state(
                model_id, ModelState.NOT_DOWNLOADED, message="deleted", files=[], revision="", source="", error=""
            )
            logger.info("model deleted", extra={"model_id": model_id})
            return self._view(model_id)

    def verify(self, model_id: str) -> VerifyResult:
        """Re-hash every file now; READY when all match, INCOMPLETE otherwise."""
        self.catalog.get(model_id)
        started = time.monotonic()
        with self._lock:
            record = self._records[model_id]
            if record.state in BUSY_STATES:
                raise ModelBusy(f"{model_id} is {record.state.value}; verify after the download ends")
            if not record.files:
                raise ModelNotReady(
                    f"{model_id} has not been downloaded; nothing to verify (PullModel or ImportModel first)"
                )
            files = list(record.files)
        checks = tuple(check_file(self.model_dir(model_id), f, deep=True) for f in files)
        ok = all(c.ok for c in checks)
        for check in checks:
            if not check.ok:
                self.metrics.verification_failures.labels(model_id).inc()
        with self._lock:
            new_state = ModelState.READY if ok else ModelState.INCOMPLETE
            problems = "; ".join(f"{c.path}: {c.problem}" for c in checks if not c.ok)
            self._set_state(
                model_id,
                new_state,
                message="verified" if ok else f"verification failed: {problems}",
                error="" if ok else problems,
            )
            view = self._view(model_id)
        logger.info("verification result", extra={"model_id": model_id, "ok": ok, "problems": problems})
        return VerifyResult(view, ok, checks, time.monotonic() - started)

    def import_model(self, model_id: str, source_dir: str) -> ModelView:
        """Copy a model from a directory on this host (or its embedded copy when
        source_dir is empty), hashing as it copies; READY only when complete."""
        entry = self.catalog.get(model_id)
        if source_dir:
            root = Path(source_dir)
            if not root.is_absolute():
                raise ImportFailed(f"source_dir must be an absolute path on the store's host, not {source_dir!r}")
            if not root.is_dir():
                raise ImportFailed(f"source_dir {source_dir!r} is not a directory on the store's host")
            sources = self._scan_import_dir(entry, root)
            origin = f"import:{root}"
        else:
            if not entry.embedded_files:
                raise InvalidArgument(
                    f"{model_id} has no embedded copy; give source_dir (a directory on the store's host)"
                )
            sources = dict(entry.embedded_files)
            origin = "embedded"
        missing = [name for name in entry.required_files if name not in sources or sources[name].stat().st_size == 0]
        if missing:
            raise ImportFailed(
                f"cannot import {model_id}: required files missing or empty in {source_dir or 'the embedded copy'}: {missing}"
            )
        with self._lock:
            record = self._records[model_id]
            if record.state in BUSY_STATES or self.queue.active(model_id) is not None:
                raise ModelBusy(f"{model_id} is {record.state.value}; cancel the download before importing")
            if self._readers.get(model_id):
                raise ModelBusy(f"{model_id} is being copied by FetchModelFiles; retry when it ends")
            previous = record.state
            self._set_state(model_id, ModelState.VERIFYING, message=f"importing from {origin}", persist=False)
        staging = self.staging_dir / f"{model_id}-{uuid.uuid4().hex[:8]}"
        try:
            files = []
            for relative, source in sorted(sources.items()):
                target = safe_join(staging, relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                hasher = FileHasher(source.stat().st_size)
                with open(source, "rb") as src, open(target, "wb") as dst:
                    while block := src.read(4 << 20):
                        dst.write(block)
                        hasher.update(block)
                    dst.flush()
                    os.fsync(dst.fileno())
                files.append(
                    FileRecord(
                        relative,
                        hasher.size,
                        hasher.sha256.hexdigest(),
                        hasher.git_sha1.hexdigest(),
                        relative in entry.required_files,
                    )
                )
            model_dir = self.model_dir(model_id)
            trash = self.staging_dir / f"trash-{model_id}-{uuid.uuid4().hex[:8]}"
            with self._lock:
                if model_dir.exists():
                    os.replace(model_dir, trash)
                os.replace(staging, model_dir)
                fsync_dir(self.models_dir)
                self._set_state(
                    model_id,
                    ModelState.READY,
                    message=f"imported from {origin}",
                    files=files,
                    revision="local",
                    requested_revision="local",
                    source=origin,
                    error="",
                )
            _remove_path(trash)
            _remove_path(self.partial_dir / model_id)
        except Exception as error:
            _remove_path(staging)
            with self._lock:
                self._set_state(
                    model_id,
                    previous if previous not in BUSY_STATES else ModelState.NOT_DOWNLOADED,
                    message=f"import failed: {error}",
                )
            if isinstance(error, VoxserveError):
                raise
            raise ImportFailed(f"import of {model_id} from {origin} failed: {error}") from error
        logger.info("model imported", extra={"model_id": model_id, "source": origin, "files": len(files)})
        return self.get_model(model_id)

    def _scan_import_dir(self, entry: CatalogEntry, root: Path) -> dict[str, Path]:
        sources: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            current = Path(dirpath)
            for name in dirnames:
                if (current / name).is_symlink():
                    raise ImportFailed(f"refusing to import: {current / name} is a symlink")
            for name in filenames:
                path = current / name
                relative = path.relative_to(root).as_posix()
                if not entry.allows(relative):
                    continue
                if path.is_symlink():
                    raise ImportFailed(f"refusing to import: {path} is a symlink")
                try:
                    validate_relative_file(relative)
                except UnsafePath as error:
                    raise ImportFailed(f"refusing to import {relative!r}: {error}") from None
                sources[relative] = path
        if not sources:
            raise ImportFailed(f"{root} holds no files matching {list(entry.allow_patterns)} for {entry.model_id}")
        return sources

    # ----------------------------------------------------------------- fetch files

    @contextlib.contextmanager
    def reading(self, model_id: str) -> Iterator[ModelView]:
        """Hold a READY model so DeleteModel refuses while its files are streamed."""
        self.catalog.get(model_id)
        with self._lock:
            record = self._records[model_id]
            if record.state != ModelState.READY:
                raise ModelNotReady(
                    f"{model_id} is {record.state.value}; only READY models can be fetched (PullModel first)"
                )
            self._readers[model_id] = self._readers.get(model_id, 0) + 1
            view = self._view(model_id)
        try:
            yield view
        finally:
            with self._lock:
                self._readers[model_id] -= 1

    def iter_file_chunks(
        self, model_id: str, chunk_size: int = 1 << 20, paths: list[str] | None = None
    ) -> Generator[FileChunkData, None, None]:
        """The bytes of a READY model's files in order, with size and sha256 of each."""
        chunk_size = max(4096, min(chunk_size or (1 << 20), MAX_FETCH_CHUNK))
        with self.reading(model_id) as view:
            wanted = [f for f in view.files if not paths or f.path in paths]
            unknown = set(paths or ()) - {f.path for f in view.files}
            if unknown:
                raise InvalidArgument(f"{model_id} has no files {sorted(unknown)}; GetModel lists its files")
            model_dir = self.model_dir(model_id)
            for index, file in enumerate(wanted):
                path = safe_join(model_dir, file.path)
                with open(path, "rb") as handle:
                    offset = 0
                    while True:
                        data = handle.read(chunk_size)
                        if not data and offset > 0:
                            break
                        yield FileChunkData(
                            file.path, offset, data, file.size, file.sha256, view.revision, index, len(wanted)
                        )
                        offset += len(data)
                        if not data:
                            break

    # ----------------------------------------------------------------- internals

    def _set_state(
        self, model_id: str, state: ModelState, *, message: str = "", persist: bool = True, **updates: object
    ) -> None:
        """Change a record, persist it, publish STATE_CHANGED. Call with the lock held."""
        record = self._records[model_id]
        for key, value in updates.items():
            setattr(record, key, value)
        record.state = state
        record.updated_at = time.time()
        if state != ModelState.WAITING:
            record.queue_position = 0
        if persist:
            self._state_file.save(self._records)
        self.bus.publish(
            StoreEvent(
                0,
                model_id,
                EventType.STATE_CHANGED,
                state,
                record.updated_at,
                bytes_total=record.size_bytes,
                bytes_done=record.size_bytes if state == ModelState.READY else 0,
                files_total=len(record.files),
                source=record.source,
                queue_position=record.queue_position,
                message=message,
            )
        )
        self._refresh_state_gauge()

    def _queue_changed(self) -> None:
        waiting = self.queue.waiting_ids()
        self.metrics.queue_length.set(len(waiting))
        with self._lock:
            for index, model_id in enumerate(waiting, start=1):
                record = self._records.get(model_id)
                if record is not None and record.state == ModelState.WAITING and record.queue_position != index:
                    self._set_state(
                        model_id, ModelState.WAITING, message="queue moved", queue_position=index, persist=False
                    )

    def _view(self, model_id: str) -> ModelView:
        entry = self.catalog.get(model_id)
        record = self._records[model_id]
        model_dir = self.model_dir(model_id)
        files = []
        on_disk = 0
        for f in record.files:
            try:
                path = safe_join(model_dir, f.path)
                size = path.stat().st_size if path.is_file() else -1
            except (OSError, UnsafePath):
                size = -1
            on_disk += max(size, 0)
            files.append(FileView(f.path, f.size, f.sha256, f.required, size == f.size))
        progress = self._progress.get(model_id)
        if progress is not None:
            on_disk = progress.bytes_done
        has_files = record.state in (ModelState.READY, ModelState.INCOMPLETE)
        return ModelView(
            model_id=model_id,
            kind=entry.kind,
            repo_id=entry.repo_id,
            revision=record.revision or entry.revision,
            requested_revision=record.requested_revision or entry.revision,
            state=record.state,
            size_bytes=record.size_bytes,
            local_path=str(model_dir) if has_files else "",
            files=tuple(files),
            source=record.source,
            error=record.error,
            updated_at=record.updated_at,
            bytes_on_disk=on_disk,
            queue_position=record.queue_position,
            description=entry.description,
        )

    def _refresh_state_gauge(self) -> None:
        counts = dict.fromkeys(ModelState, 0)
        for record in self._records.values():
            counts[record.state] += 1
        for state, count in counts.items():
            self.metrics.models_by_state.labels(state.value).set(count)

    def _refresh_gauges(self) -> None:
        with self._lock:
            self._refresh_state_gauge()
            for model_id, record in self._records.items():
                if record.state == ModelState.READY:
                    self.metrics.model_disk_bytes.labels(model_id).set(record.size_bytes)
                elif record.state == ModelState.NOT_DOWNLOADED:
                    self.metrics.model_disk_bytes.labels(model_id).set(0)
        with contextlib.suppress(OSError):
            self.metrics.disk_free_bytes.set(shutil.disk_usage(self.data_dir).free)

    @property
    def records(self) -> Mapping[str, ModelRecord]:
        return self._records


def _remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
