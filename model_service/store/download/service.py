"""PullModel, CancelDownload, pause and resume: the download queue and its persisted state.

DownloadService starts, joins, pauses and cancels downloads; the pipeline one job runs is
DownloadPipeline (pipeline.py), the persisted queue QueueFile (queue_file.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from opentelemetry import context as otel_context

from model_service.catalog import Catalog
from model_service.config import ModelStoreConfig
from model_service.errors import DownloadPaused, ModelBusy, ModelNotReady, UnknownSource
from model_service.metrics import ModelStoreMetrics
from model_service.paths import validate_revision
from model_service.spans import WorkSpans
from model_service.state import ModelState
from model_service.store.download.files import FileDownloader
from model_service.store.download.hub import HubClient
from model_service.store.download.pipeline import DownloadPipeline
from model_service.store.download.queue import DownloadJob, DownloadQueue, StopReason
from model_service.store.download.queue_file import DownloadRequest, QueueFile
from model_service.store.download.retry import Retrier
from model_service.store.download.sources import (
    FAILURE_KINDS,
    BreakerState,
    SourceBreakers,
    SourceHealth,
    SourceObserver,
)
from model_service.store.registry import ModelRegistry, ModelView
from model_service.validator import check_file
from voxserve_common.errors import VoxserveError

logger = logging.getLogger(__name__)


@dataclass
class DownloadTicket:
    """What request() started or joined; ``job`` is None when the model was READY already."""

    model_id: str
    start_sequence: int
    job: DownloadJob | None
    joined: bool = False
    view: ModelView | None = None


class _SourceMetrics(SourceObserver):
    """voxserve_source_up / voxserve_source_failures_total from the breakers' reports."""

    def __init__(self, metrics: ModelStoreMetrics) -> None:
        self._metrics = metrics

    def failure(self, source: str, kind: str) -> None:
        self._metrics.source_failures.labels(source, kind).inc()

    def state_changed(self, source: str, state: BreakerState) -> None:
        self._metrics.source_up.labels(source).set(1 if state == BreakerState.CLOSED else 0)


class DownloadService:
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
        self.retrier = Retrier(self.breakers, config.download_retries)
        self._queue_file = QueueFile(registry.data_dir / "queue.json")
        self._queue_file_lock = threading.Lock()
        self._queue_frozen = False  # set by stop(): what the queue held then is what resumes
        self._paused: dict[str, DownloadRequest] = {}  # under the registry lock
        self.spans = WorkSpans([hub.token])
        self.pipeline = DownloadPipeline(
            registry,
            catalog,
            hub,
            config,
            metrics,
            FileDownloader(hub, self.retrier),
            self.retrier,
            on_paused=self._remember_paused,
            spans=self.spans,
        )
        self.queue = DownloadQueue(self.pipeline.run, config.max_concurrent_downloads, on_change=self._queue_changed)

    def apply_config(self, config: ModelStoreConfig) -> None:
        """New settings for what comes next (SIGHUP): breakers, retries, hub timeout and
        the disk reserve; a request already on the wire keeps its timeout."""
        self.breakers.threshold = config.breaker_failures
        self.breakers.cooldown = config.breaker_cooldown_seconds
        self.retrier.retries = config.download_retries
        self.hub.timeout = config.hub_timeout_seconds
        self.config = self.pipeline.config = config

    # ----------------------------------------------------------------- requests

    def request(self, model_id: str, revision: str | None = None, source: str | None = None) -> DownloadTicket:
        """What PullModel asks for: start, join or short-circuit a download.

        READY and intact (sizes on disk match) -> returns at once without the network.
        PAUSED -> resumed (queued at the end, with the revision and source it had unless
        others are given). ``source`` (a name or URL) restricts the download to that one
        endpoint. Raises ModelNotFound / InvalidModelId for bad ids, UnknownSource for a
        source that is not configured, ModelBusy while ImportModel copies the model.
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
                return DownloadTicket(model_id, start_sequence, active, joined=True)
            record = registry.record(model_id)
            wanted = revision or entry.revision
            if record.state == ModelState.VERIFYING:  # without a job: ImportModel is copying it
                raise ModelBusy(f"{model_id} is being imported; pull it again when the import has ended")
            if record.state == ModelState.PAUSED:
                saved = self._paused.get(model_id, DownloadRequest(model_id))
                request = DownloadRequest(model_id, revision or saved.revision, source_name or saved.source)
                return self._enqueue(request, start_sequence, trust_sizes=False, message="resumed")
            if record.state == ModelState.READY and wanted in (record.revision, record.requested_revision, "local"):
                if all(check_file(registry.model_dir(model_id), f, deep=False).ok for f in record.files):
                    return DownloadTicket(model_id, start_sequence, None, view=registry.view(model_id))
                logger.warning("READY model has missing or resized files; repairing", extra={"model_id": model_id})
            elif record.state == ModelState.READY and revision is None:
                return DownloadTicket(model_id, start_sequence, None, view=registry.view(model_id))
            # Only a READY model's files are known good; after a failed verification, a
            # crash or an error, files on disk are re-hashed before they are kept.
            trust_sizes = record.state == ModelState.READY
            return self._enqueue(
                DownloadRequest(model_id, revision, source_name), start_sequence, trust_sizes, "queued"
            )

    def _enqueue(
        self, request: DownloadRequest, start_sequence: int, trust_sizes: bool, message: str
    ) -> DownloadTicket:
        """WAITING at the end of the queue. Call inside ``registry.locked()``."""
        model_id = request.model_id
        position = len(self.queue) + 1
        self._paused.pop(model_id, None)
        self.registry.transition(
            model_id, ModelState.WAITING, message=message, error="", queue_position=position, persist=False
        )
        job, joined = self.queue.submit(
            model_id,
            request.revision,
            trust_sizes=trust_sizes,
            source=request.source,
            trace_context=otel_context.get_current(),  # the RPC's: parent of the job's work spans
        )
        logger.info(
            "download queued",
            extra={"model_id": model_id, "job_id": job.job_id, "queue_position": position, "source": request.source},
        )
        return DownloadTicket(model_id, start_sequence, job, joined=joined)

    def cancel(self, model_id: str, wait_seconds: float = 15.0) -> ModelView:
        """Stop a running or waiting download and wait (up to ``wait_seconds``) for it to
        end; its partial files are removed (a PAUSED model's too). Returns the model as it
        is then; ModelNotReady when nothing downloads, waits or is paused."""
        self.catalog.get(model_id)
        job = self.queue.cancel(model_id)
        if job is None:
            with self.registry.locked():
                state = self.registry.record(model_id).state
                was_paused = state == ModelState.PAUSED and self.queue.active(model_id) is None
                if was_paused:
                    self._paused.pop(model_id, None)
                    self.pipeline.after_cancel(model_id)
                    self.registry.after_unlock(self._save_queue)
                    logger.info("paused download cancelled", extra={"model_id": model_id})
            if not was_paused:
                raise ModelNotReady(
                    f"nothing to cancel: {model_id} is {state.value}, not downloading, waiting or paused"
                )
            return self.registry.view(model_id)
        if not job.running and job.started_at is None:
            self.pipeline.after_cancel(model_id)
        job.done_event.wait(wait_seconds)
        logger.info("download cancelled", extra={"model_id": model_id, "job_id": job.job_id})
        return self.registry.view(model_id)

    def pause(self, model_id: str, wait_seconds: float = 15.0) -> ModelView:
        """Stop a running download (waiting up to ``wait_seconds`` for it to stop) or take
        a waiting one out of the queue; its bytes stay on disk and the model is PAUSED.
        Returns the model as it is then.

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
        request = DownloadRequest(model_id, job.revision, job.source)
        paused = DownloadPaused(f"{model_id} paused; ResumeDownload continues it")
        stopped = self.queue.stop_job(model_id, StopReason.PAUSE, paused)
        if stopped is None:  # it ended meanwhile
            return registry.view(model_id)
        if stopped.started_at is None:  # taken out of the queue before it ran
            with registry.locked():
                self._paused[model_id] = request
                registry.transition(model_id, ModelState.PAUSED, message=paused.args[0], error="")
            self._save_queue()
        stopped.done_event.wait(wait_seconds)
        logger.info("download paused", extra={"model_id": model_id, "job_id": stopped.job_id})
        return registry.view(model_id)

    def resume(self, model_id: str) -> ModelView:
        """Queue a PAUSED model again, at the end of the queue (it continues from the bytes
        on disk); ModelNotReady (naming the state) for any other state."""
        self.catalog.get(model_id)
        with self.registry.locked():
            state = self.registry.record(model_id).state
            if state != ModelState.PAUSED or self.queue.active(model_id) is not None:
                raise ModelNotReady(f"cannot resume {model_id}: it is {state.value}, not PAUSED")
            request = self._paused.get(model_id, DownloadRequest(model_id))
            self._enqueue(request, self.registry.bus.sequence, trust_sizes=False, message="resumed")
        return self.registry.view(model_id)

    def restore_queue(self, resume: bool) -> None:
        """At start-up, after the records are loaded: remember what paused downloads asked
        for and, when ``resume``, queue again the downloads that ran or waited at the last
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
        for saved in queued:
            try:
                try:
                    self.request(saved.model_id, saved.revision, saved.source)
                except UnknownSource:
                    logger.warning(
                        "the source of a resumed download is no longer configured; using every source",
                        extra={"model_id": saved.model_id, "source": saved.source},
                    )
                    self.request(saved.model_id, saved.revision)
            except VoxserveError as error:
                logger.warning("could not resume a download", extra={"model_id": saved.model_id, "error": str(error)})
            else:
                logger.info("download resumed after restart", extra={"model_id": saved.model_id})
        self._save_queue()

    def _save_queue(self) -> None:
        """Write queue.json as the queue is now; a failed write is retried (registry.writes)."""
        with self._queue_file_lock:
            if self._queue_frozen:
                return
            queued = [DownloadRequest(j.model_id, j.revision, j.source) for j in self.queue.jobs()]
            paused = list(dict(self._paused).values())
            self.registry.writes.write(
                "queue.json", lambda: self._queue_file.save(queued, paused), retry=self._save_queue
            )

    def is_downloading(self, model_id: str) -> bool:
        job = self.queue.active(model_id)
        return job is not None and not job.done_event.is_set()

    def wait_finishing(self, model_id: str, timeout: float = 10.0) -> None:
        """Wait for the job of a model that already reached its end state: a job publishes
        READY (or FAILED) as its last step and leaves the queue moments later, so a call
        made on seeing that state must not find the job still running."""
        job = self.queue.active(model_id)
        if job is not None and job.started_at is not None:
            job.done_event.wait(timeout)

    def stop(self) -> None:
        """Graceful stop: write the queue as it is now (resumed at the next start), then
        stop the jobs keeping their partial files and sidecars."""
        with self._queue_file_lock:
            queued = [DownloadRequest(j.model_id, j.revision, j.source) for j in self.queue.jobs()]
            paused = list(dict(self._paused).values())
            # Not retried: a store that cannot write it now resumes nothing at its next start,
            # and the models' partial files wait for their next pull.
            saved = self.registry.writes.write(
                "queue.json", lambda: self._queue_file.save(queued, paused, graceful=True), retry=None
            )
            self._queue_frozen = True
        if saved:
            logger.info("download queue saved for the next start", extra={"models": [r.model_id for r in queued]})
        self.queue.stop()

    def forget_paused(self, model_id: str) -> None:
        """The model's files were deleted: nothing of a paused download is left to resume."""
        with self.registry.locked():
            if self._paused.pop(model_id, None) is not None:
                self.registry.after_unlock(self._save_queue)

    def source_health(self) -> list[SourceHealth]:
        """Every configured hub endpoint with its health and breaker state, in order (ListSources)."""
        return self.breakers.health()

    def _remember_paused(self, job: DownloadJob) -> None:
        """What a job stopped by a pause asked for (the pipeline calls it under the registry lock)."""
        self._paused[job.model_id] = DownloadRequest(job.model_id, job.revision, job.source)

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
