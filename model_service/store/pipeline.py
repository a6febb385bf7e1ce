"""The pipeline one download job runs, on a queue worker thread.

resolve the manifest (endpoint chain) -> plan (keep files already good, resume
partials) -> check the disk -> fetch each missing file into partial/ -> move it into
models/ -> check sizes -> READY. Every state change goes through the registry.
PullService owns one and hands ``run`` to its DownloadQueue.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from opentelemetry.util.types import AttributeValue

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.download_queue import DownloadJob, StopReason
from model_service.downloader import FileFetcher, PartialFile
from model_service.errors import (
    DownloadCancelled,
    DownloadPaused,
    InsufficientDisk,
    IntegrityError,
    RemoteNotFound,
    SourcesFailed,
    UnsafePath,
)
from model_service.hub import (
    HubClient,
    RemoteFile,
    RemoteManifest,
    SourceBreakers,
    SourceError,
    backoff_delay,
    display_url,
)
from model_service.metrics import ModelStoreMetrics
from model_service.paths import remove_files_except, remove_path, safe_join, validate_relative_file
from model_service.spans import FILE_TRANSFER, RESOLVE_MANIFEST, VERIFY, WorkSpans, url_without_credentials
from model_service.state import FileRecord, ModelState, fsync_dir
from model_service.store.progress import DownloadProgress, ProgressReporter, VerifyReporter
from model_service.store.registry import ModelRegistry
from model_service.validator import check_file
from voxserve_common.errors import Internal, VoxserveError
from voxserve_common.logs import log_context

# The logger pull.py used, so download log lines keep the name operators filter on.
logger = logging.getLogger("model_service.store.pull")


@dataclass(frozen=True)
class _Plan:
    """What a job must fetch after looking at the disk."""

    files: tuple[FileRecord, ...]  # the manifest's files, sha256 filled where known
    to_fetch: tuple[RemoteFile, ...]
    # Kept on disk by their size but not known good (the model was not READY): VERIFYING
    # re-hashes them, and fetches again those that fail.
    to_verify: tuple[FileRecord, ...]
    present_bytes: int  # in files kept as they are (to_verify included)
    resumable_bytes: int  # in partial files that will be resumed


class PullPipeline:
    """Runs one DownloadJob to READY, ERROR, PAUSED or its resting state after a cancel.

    ``on_paused(job)`` is called under the registry lock when a job stops for a pause,
    so the owner can remember what to resume.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        catalog: Catalog,
        hub: HubClient,
        config: ModelStoreConfig,
        metrics: ModelStoreMetrics,
        fetcher: FileFetcher,
        breakers: SourceBreakers,
        retry_backoff_seconds: float,
        on_paused: Callable[[DownloadJob], None],
        spans: WorkSpans | None = None,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.hub = hub
        self.config = config
        self.metrics = metrics
        self.fetcher = fetcher
        self.breakers = breakers
        self.retry_backoff_seconds = retry_backoff_seconds
        self._on_paused = on_paused
        self.spans = spans or WorkSpans([hub.token])

    def run(self, job: DownloadJob) -> None:
        with log_context(model_id=job.model_id, job_id=job.job_id):
            self.spans.queue_wait(
                job.trace_context,
                job.enqueued_ns,
                {"voxserve.model_id": job.model_id, "voxserve.queue.position": job.queue_position},
            )
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
            self.metrics.downloads_completed.labels(job.model_id, display_url(source)).inc()
            self.metrics.download_duration.labels(job.model_id).observe(duration)
            logger.info(
                "model ready", extra={"model_id": job.model_id, "source": source, "seconds": round(duration, 3)}
            )
            job.finish(None)

    def after_cancel(self, model_id: str) -> None:
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

    def _after_stop(self, job: DownloadJob, error: DownloadCancelled) -> None:
        """A job stopped by its cancel event: remove its partial files only for a cancel."""
        model_id = job.model_id
        if job.stop_reason == StopReason.PAUSE:
            paused = DownloadPaused(f"{model_id} paused; ResumeDownload continues it")
            with self.registry.locked():
                self._on_paused(job)
                self.registry.transition(model_id, ModelState.PAUSED, message=paused.args[0], error="")
            logger.info("download paused; partial files kept", extra={"model_id": model_id})
            job.finish(paused)
        elif job.stop_reason == StopReason.SHUTDOWN:
            # state.json says DOWNLOADING: the next start marks it INCOMPLETE and, from
            # queue.json, queues it again; the partial files and sidecars resume it.
            logger.info("download stopped by shutdown; partial files kept", extra={"model_id": model_id})
            job.finish(error)
        else:
            self.after_cancel(model_id)
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
        with self.spans.span(
            RESOLVE_MANIFEST,
            {"voxserve.model_id": model_id, "voxserve.revision": revision},
            parent=job.trace_context,
        ) as span:
            manifest = self._resolve_manifest(job, entry, revision, endpoints)
            span.set_attributes(
                {
                    "voxserve.source": self.hub.name_of(manifest.endpoint),
                    "voxserve.files": len(manifest.files),
                    "voxserve.commit": manifest.commit,
                }
            )
        old_files = {f.path: f for f in self.registry.record(model_id).files}
        files = _manifest_records(manifest, entry, old_files)
        self.registry.transition(
            model_id,
            ModelState.DOWNLOADING,
            message=f"downloading {len(files)} files from {display_url(manifest.endpoint)}",
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
        self.metrics.downloads_started.labels(model_id, display_url(manifest.endpoint)).inc()
        reporter = ProgressReporter(model_id, progress, self.registry.bus, self.metrics)
        source, fetched = self._fetch_all(job, manifest, plan.to_fetch, reporter, endpoints)
        files = tuple(replace(f, sha256=fetched.get(f.path, f.sha256)) for f in plan.files)
        to_verify = plan.to_verify
        while True:
            files, bad = self._verify(job, files, to_verify, progress, source or manifest.endpoint)
            if not bad:
                break
            # Files kept from disk failed their hash (removed by _verify): fetch them again.
            # Their bytes no longer count as done; the one time the bar steps back.
            progress.bytes_done -= sum(f.size for f in bad)
            progress.files_done -= len(bad)
            self.registry.transition(
                model_id, ModelState.DOWNLOADING, message=f"fetching {len(bad)} files again: they failed verification"
            )
            by_path = {remote.path: remote for remote in manifest.files}
            again, more = self._fetch_all(job, manifest, tuple(by_path[f.path] for f in bad), reporter, endpoints)
            source = again or source
            files = tuple(replace(f, sha256=more.get(f.path, f.sha256)) for f in files)
            to_verify = ()
        return self._finish(model_id, files, source or manifest.endpoint)

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
                reasons.append(f"{display_url(endpoint)}: {error.reason}")
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
                delay = backoff_delay(attempt, self.retry_backoff_seconds)
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
        """Keep files on disk whose size is right: a READY model's unchanged files as they
        are, others to be re-hashed while VERIFYING; remove bad ones; count resumable partials."""
        model_dir = self.registry.model_dir(entry.model_id)
        model_dir.mkdir(parents=True, exist_ok=True)
        kept: list[FileRecord] = []
        to_fetch: list[RemoteFile] = []
        to_verify: list[FileRecord] = []
        present = 0
        for remote, record in zip(manifest.files, files, strict=True):
            old = old_files.get(remote.path)
            trusted = job.trust_sizes and old is not None and _same_blob(old, remote)
            expected = replace(record, sha256=old.sha256) if trusted and old is not None else record
            check = check_file(model_dir, expected, deep=False)
            if check.ok:
                present += remote.size
                kept.append(record)
                if not trusted:
                    to_verify.append(record)
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
        return _Plan(tuple(kept), tuple(to_fetch), tuple(to_verify), present, resumable)

    def _fetch_all(
        self,
        job: DownloadJob,
        manifest: RemoteManifest,
        to_fetch: tuple[RemoteFile, ...],
        reporter: ProgressReporter,
        allowed: list[str],
    ) -> tuple[str, dict[str, str]]:
        """Fetch and move in each missing file; returns the last source and each file's sha256."""
        model_id = job.model_id
        model_dir = self.registry.model_dir(model_id)
        partial_root = self.registry.partial_root(model_id)
        endpoints = [manifest.endpoint, *[e for e in allowed if e != manifest.endpoint]]
        source = ""
        sha256: dict[str, str] = {}
        for remote in to_fetch:
            partial = PartialFile.for_target(partial_root, Path(validate_relative_file(remote.path)))
            logger.info("file started", extra={"file": remote.path, "size": remote.size})
            reporter.start_file(remote.path)
            with self.spans.span(
                FILE_TRANSFER,
                {
                    "voxserve.file.path": remote.path,
                    "voxserve.file.bytes": remote.size,
                    "voxserve.file.resumed_from": _size_or_zero(partial.part),
                    "voxserve.source": self.hub.name_of(endpoints[0]),
                    "url.full": url_without_credentials(endpoints[0]),
                },
                parent=job.trace_context,
            ) as span:
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
                span.set_attributes(
                    {
                        "voxserve.file.resumed_from": result.resumed_from,
                        "voxserve.file.bytes_fetched": result.bytes_fetched,
                        "voxserve.source": self.hub.name_of(result.source),
                        "url.full": url_without_credentials(result.source),
                    }
                )
                _move_into_place(partial, model_dir, remote.path)
            source = result.source
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

    def _verify(
        self,
        job: DownloadJob,
        files: tuple[FileRecord, ...],
        to_verify: tuple[FileRecord, ...],
        progress: DownloadProgress,
        source: str,
    ) -> tuple[tuple[FileRecord, ...], list[FileRecord]]:
        """VERIFYING: re-hash the files kept from disk that this pull did not hash while
        writing them (with verification progress events), then check every file's size.

        Returns the records (sha256 filled in by the re-hash) and the re-hashed files that
        failed, already removed, for the caller to fetch again. Raises IntegrityError when
        a file is missing or has the wrong size (a fetched file changed on disk).
        """
        model_id = job.model_id
        registry = self.registry
        rehash_total = sum(f.size for f in to_verify)
        verify = VerifyReporter(model_id, progress, registry.bus)
        verify.start(rehash_total)
        attributes: dict[str, AttributeValue] = {
            "voxserve.files": len(files),
            "voxserve.bytes": sum(f.size for f in files),
            "voxserve.verify.rehashed_bytes": rehash_total,
        }
        with self.spans.span(VERIFY, attributes, parent=job.trace_context):
            message = f"re-hashing {len(to_verify)} files kept on disk" if to_verify else "checking files"
            registry.transition(model_id, ModelState.VERIFYING, message=message, files=files, source=source)
            model_dir = registry.model_dir(model_id)
            hashed: dict[str, str] = {}
            bad: list[FileRecord] = []
            for record in to_verify:
                verify.file(record.path)
                check = check_file(
                    model_dir,
                    record,
                    deep=True,
                    cancel=job.cancel_event,
                    on_bytes=verify.on_bytes,
                    block_size=self.config.download_chunk_bytes,
                )
                if check.ok:
                    hashed[record.path] = check.actual_sha256
                    continue
                logger.warning(
                    "existing file is bad; fetching it again", extra={"file": record.path, "problem": check.problem}
                )
                safe_join(model_dir, record.path).unlink(missing_ok=True)
                bad.append(record)
            if to_verify:
                verify.publish(force=True)  # the last one says done == total
            files = tuple(replace(f, sha256=hashed.get(f.path) or f.sha256) for f in files)
            if bad:
                return files, bad
            wrong = [c for c in (check_file(model_dir, f, deep=False) for f in files) if not c.ok]
            if wrong:
                for _ in wrong:
                    self.metrics.verification_failures.labels(model_id).inc()
                raise IntegrityError(
                    f"{model_id} failed verification: " + "; ".join(f"{c.path}: {c.problem}" for c in wrong)
                )
        return files, []

    def _finish(self, model_id: str, files: tuple[FileRecord, ...], source: str) -> str:
        """After a verification that passed: drop partials and strays, then READY."""
        registry = self.registry
        model_dir = registry.model_dir(model_id)
        remove_path(registry.partial_root(model_id))
        remove_files_except(model_dir, {f.path for f in files})
        registry.transition(
            model_id,
            ModelState.READY,
            message=f"ready from {display_url(source)}",
            files=files,
            source=source,
            error="",
        )
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


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


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
