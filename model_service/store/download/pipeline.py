"""The pipeline one download job runs, on a queue worker thread.

resolve the manifest (endpoint chain) -> plan (keep files already good, resume
partials) -> check the disk -> download each missing file into partial/ -> move it into
models/ -> check sizes -> READY. Every state change goes through the registry.
DownloadService owns one and hands ``run`` to its DownloadQueue. At DEBUG each step logs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from opentelemetry.util.types import AttributeValue

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.errors import DownloadCancelled, DownloadPaused, IntegrityError
from model_service.metrics import ModelStoreMetrics
from model_service.paths import remove_files_except, remove_path, safe_join, validate_relative_file
from model_service.spans import FILE_TRANSFER, RESOLVE_MANIFEST, VERIFY, WorkSpans
from model_service.state import FileRecord, ModelState
from model_service.store.download.disk import check_free_space, disk_error, move_into_place
from model_service.store.download.files import FileDownloader, LocalDiskError, PartialFile
from model_service.store.download.hub import HubClient, RemoteFile, RemoteManifest
from model_service.store.download.manifest import manifest_records, resolve_manifest
from model_service.store.download.plan import make_plan
from model_service.store.download.queue import DownloadJob, StopReason
from model_service.store.download.retry import Retrier
from model_service.store.progress import DownloadProgress, ProgressReporter, VerifyReporter
from model_service.store.registry import ModelRegistry
from model_service.urls import display_url, url_without_credentials
from model_service.validator import check_file
from voxserve_common.errors import Internal, VoxserveError, category_of
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)


class DownloadPipeline:
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
        downloader: FileDownloader,
        retrier: Retrier,
        on_paused: Callable[[DownloadJob], None],
        spans: WorkSpans,
    ) -> None:
        self.registry = registry
        self.catalog = catalog
        self.hub = hub
        self.config = config
        self.metrics = metrics
        self.downloader = downloader
        self.retrier = retrier
        self._on_paused = on_paused
        self.spans = spans

    def run(self, job: DownloadJob) -> None:
        with log_context(model_id=job.model_id, job_id=job.job_id):
            self.spans.queue_wait(
                job.trace_context,
                job.enqueued_ns,
                {"voxserve.model_id": job.model_id, "voxserve.queue.position": job.queue_position},
            )
            entry = self.catalog.get(job.model_id)
            started = time.monotonic()
            logger.debug(
                "download started",
                extra={
                    "revision": job.revision or entry.revision,
                    "source": job.source or "",
                    "waited_seconds": round(started - job.submitted_at, 3),
                },
            )
            try:
                source = self._download(job, entry, job.revision or entry.revision)
            except DownloadCancelled as error:
                self._after_stop(job, error)
                return
            except VoxserveError as error:
                self._fail(job, error)
                return
            except Exception as error:  # noqa: BLE001 - logged with its traceback when it is a bug
                self._fail(job, self._unexpected(job.model_id, error))
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

    def _unexpected(self, model_id: str, error: Exception) -> VoxserveError:
        """What a download that raised outside the domain's errors ends with: the store's
        own disk failing (disk full, read-only filesystem, ...) is the operator's to fix
        and never the source's fault; anything else is a bug (Internal, logged with its
        traceback)."""
        if isinstance(error, LocalDiskError | OSError):
            view = self.registry.view(model_id)  # its bytes_on_disk are the download's counts
            found = disk_error(error, self.registry.data_dir, model_id, max(view.size_bytes - view.bytes_on_disk, 0))
            if found is not None:
                return found
        logger.exception("download crashed", exc_info=error)
        return Internal(f"download of {model_id} failed unexpectedly: {type(error).__name__}: {error}")

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
        # Counted in voxserve_errors_total by its category: a full disk is not an Internal error.
        logger.error(
            "download failed",
            extra={
                "model_id": job.model_id,
                "error": str(error),
                "reason": reason,
                "error_category": category_of(error),
            },
        )
        self.registry.transition(job.model_id, ModelState.ERROR, message=str(error), error=str(error))
        job.finish(error)

    def _download(self, job: DownloadJob, entry: CatalogEntry, revision: str) -> str:
        """Run one job to READY and return the endpoint the last file came from."""
        model_id = entry.model_id
        endpoints = [self.hub.find_source(job.source).url] if job.source else list(self.hub.endpoints)
        manifest, files, old_files = self._resolve(job, entry, revision, endpoints)
        plan = make_plan(
            self.registry.model_dir(model_id),
            self.registry.partial_root(model_id),
            manifest,
            files,
            old_files,
            job.trust_sizes,
        )
        check_free_space(self.registry.data_dir, model_id, plan, self.config.disk_reserve_bytes)
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
        source, downloaded = self._download_files(job, manifest, plan.to_fetch, reporter, endpoints)
        files = tuple(replace(f, sha256=downloaded.get(f.path, f.sha256)) for f in plan.files)
        to_verify = plan.to_verify
        while True:
            files, bad = self._verify(job, files, to_verify, progress, source or manifest.endpoint)
            if not bad:
                break
            # Files kept from disk failed their hash (removed by _verify): download them again.
            # Their bytes no longer count as done; the one time the bar steps back.
            progress.bytes_done -= sum(f.size for f in bad)
            progress.files_done -= len(bad)
            self.registry.transition(
                model_id, ModelState.DOWNLOADING, message=f"fetching {len(bad)} files again: they failed verification"
            )
            by_path = {remote.path: remote for remote in manifest.files}
            again, more = self._download_files(job, manifest, tuple(by_path[f.path] for f in bad), reporter, endpoints)
            source = again or source
            files = tuple(replace(f, sha256=more.get(f.path, f.sha256)) for f in files)
            to_verify = ()
        return self._finish(model_id, files, source or manifest.endpoint)

    def _resolve(
        self, job: DownloadJob, entry: CatalogEntry, revision: str, endpoints: list[str]
    ) -> tuple[RemoteManifest, tuple[FileRecord, ...], dict[str, FileRecord]]:
        """DOWNLOADING: the manifest (in its span), then the record's files, revision and
        source. Returns the manifest, its records and the files the record had before."""
        model_id = entry.model_id
        self.registry.transition(
            model_id, ModelState.DOWNLOADING, message=f"resolving {entry.repo_id}@{revision}", persist=False
        )
        with self.spans.span(
            RESOLVE_MANIFEST,
            {"voxserve.model_id": model_id, "voxserve.revision": revision},
            parent=job.trace_context,
        ) as span:
            manifest = resolve_manifest(
                self.hub, self.retrier, endpoints, entry, revision, requested=bool(job.source), cancel=job.cancel_event
            )
            span.set_attributes(
                {
                    "voxserve.source": self.hub.name_of(manifest.endpoint),
                    "voxserve.files": len(manifest.files),
                    "voxserve.commit": manifest.commit,
                }
            )
        old_files = {f.path: f for f in self.registry.record(model_id).files}
        files = manifest_records(manifest, entry, old_files)
        self.registry.transition(
            model_id,
            ModelState.DOWNLOADING,
            message=f"downloading {len(files)} files from {display_url(manifest.endpoint)}",
            revision=manifest.commit,
            requested_revision=revision,
            files=files,
            source=manifest.endpoint,
        )
        return manifest, files, old_files

    def _download_files(
        self,
        job: DownloadJob,
        manifest: RemoteManifest,
        to_fetch: tuple[RemoteFile, ...],
        reporter: ProgressReporter,
        allowed: list[str],
    ) -> tuple[str, dict[str, str]]:
        """Download and move in each missing file; returns the last source and each file's sha256."""
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
                result = self.downloader.download(
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
                move_into_place(partial, model_dir, remote.path)
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
        logger.debug(
            "verification started",
            extra={"files": len(files), "rehash_files": len(to_verify), "rehash_bytes": rehash_total},
        )
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


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
