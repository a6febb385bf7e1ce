"""The download queue: FIFO, N jobs at a time, one job per model that later PullModel calls join."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry.context import Context

from model_service.errors import DownloadCancelled

logger = logging.getLogger(__name__)


class StopReason(enum.StrEnum):
    """Why a job's ``cancel_event`` was set: what the job must do with its partial files."""

    CANCEL = "cancel"  # CancelDownload: remove them
    PAUSE = "pause"  # PauseDownload: keep them, the model is PAUSED
    SHUTDOWN = "shutdown"  # graceful stop: keep them, the queue file resumes the job


@dataclass
class DownloadJob:
    """One download of one model; every PullModel of the same model while it waits or runs
    joins this object instead of starting another download."""

    model_id: str
    revision: str | None
    source: str | None = None  # the one endpoint (name) to use; None = every configured one
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    joiners: int = 1  # PullModel calls served by this job; counted by DownloadQueue.join only
    # Files already on disk were hashed when stored and nothing has found them bad since
    # (the model was READY): a size check is enough to keep them.
    trust_sizes: bool = False
    stop_reason: StopReason | None = None  # set with cancel_event
    # The OpenTelemetry context of the RPC that queued the job (its work spans' parent),
    # when it was queued (wall clock, for the queue-wait span) and at which position.
    trace_context: Context | None = None
    enqueued_ns: int = field(default_factory=time.time_ns)
    queue_position: int = 0
    _done_callbacks: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)

    def stop(self, reason: StopReason) -> None:
        """Ask the job to stop; the first reason given wins."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancel_event.set()

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

    def join(self, model_id: str) -> DownloadJob | None:
        """The waiting or running job of ``model_id``, counted as joined by one more PullModel."""
        with self._cond:
            job = self._active(model_id)
            if job is not None:
                job.joiners += 1  # the one place a joining PullModel is counted
            return job

    def submit(
        self,
        model_id: str,
        revision: str | None,
        trust_sizes: bool = False,
        source: str | None = None,
        trace_context: Context | None = None,
    ) -> tuple[DownloadJob, bool]:
        """Queue a job, or join the waiting/running one of the same model (joined=True)."""
        with self._cond:
            existing = self.join(model_id)
            if existing is not None:
                return existing, True
            job = DownloadJob(
                model_id,
                revision,
                source,
                trust_sizes=trust_sizes,
                trace_context=trace_context,
                queue_position=len(self._waiting) + 1,
            )
            self._waiting.append(job)
            self._cond.notify()
        self._on_change()
        return job, False

    def active(self, model_id: str) -> DownloadJob | None:
        """The waiting or running job of ``model_id``, if any (not counted as a join)."""
        with self._cond:
            return self._active(model_id)

    def _active(self, model_id: str) -> DownloadJob | None:
        if model_id in self._running:
            return self._running[model_id]
        for job in self._waiting:
            if job.model_id == model_id:
                return job
        return None

    def waiting_ids(self) -> list[str]:
        with self._cond:
            return [job.model_id for job in self._waiting]

    def jobs(self) -> list[DownloadJob]:
        """Running jobs (in the order they started), then waiting ones in queue order."""
        with self._cond:
            return [*self._running.values(), *self._waiting]

    def cancel(self, model_id: str) -> DownloadJob | None:
        """Signal a running job to stop, or take a waiting one out of the line."""
        return self.stop_job(
            model_id, StopReason.CANCEL, DownloadCancelled(f"download of {model_id} cancelled while waiting")
        )

    def stop_job(self, model_id: str, reason: StopReason, waiting_error: BaseException) -> DownloadJob | None:
        """Signal the running job of ``model_id`` to stop for ``reason``, or take a waiting
        one out of the line and finish it with ``waiting_error``; None when neither exists."""
        removed = None
        with self._cond:
            job = self._running.get(model_id)
            if job is not None:
                job.stop(reason)
                return job
            for candidate in self._waiting:
                if candidate.model_id == model_id:
                    removed = candidate
                    break
            if removed is not None:
                self._waiting.remove(removed)
                removed.stop(reason)
        if removed is not None:
            removed.finish(waiting_error)
            self._on_change()
        return removed

    def __len__(self) -> int:
        with self._cond:
            return len(self._waiting)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every job (reason SHUTDOWN: partial files stay) and join the workers."""
        with self._cond:
            self._stopping = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._running.values():
                job.stop(StopReason.SHUTDOWN)
            self._cond.notify_all()
        for job in waiting:
            job.stop(StopReason.SHUTDOWN)
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
            self._changed()
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
                self._changed()

    def _changed(self) -> None:
        """Tell the owner the queue changed, from a worker: nothing it raises may end the
        worker (one that died once left every later pull WAITING until a restart)."""
        try:
            self._on_change()
        except Exception:
            logger.exception("download queue: the change listener failed; the worker goes on")
