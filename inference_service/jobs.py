"""Transcription jobs: admission control, per-job event history, cancel, retention.

Each job records its events (accepted, progress, info, segment, completed) with a per-job
sequence, so a client that lost its stream re-attaches with WatchJob(after_sequence) and
gets every remaining event exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import enum
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from inference_service.engines.whisper import Segment, TranscribeOptions, TranscriptionInfo
from inference_service.metrics import InferenceMetrics
from inference_service.payloads import Accepted, Completed
from inference_service.speakers import DiarizationRequest
from voxserve_common.client_strings import check_job_id, shown
from voxserve_common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    NotFound,
    ResourceExhausted,
)
from voxserve_common.eventlog import EventLog, Followed
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ENDED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class Phase(enum.StrEnum):
    QUEUED = "QUEUED"
    PULLING_MODEL = "PULLING_MODEL"
    LOADING_MODEL = "LOADING_MODEL"
    DECODING = "DECODING"
    SEPARATING = "SEPARATING"
    VAD = "VAD"
    TRANSCRIBING = "TRANSCRIBING"
    DONE = "DONE"
    DIARIZING = "DIARIZING"


@dataclass(frozen=True)
class Progress:
    phase: Phase
    percent: float
    message: str = ""
    bytes_done: int = 0
    bytes_total: int = 0


Payload = Accepted | Progress | TranscriptionInfo | Segment | Completed


@dataclass(frozen=True)
class JobEvent:
    sequence: int
    timestamp: float
    payload: Payload


@dataclass(frozen=True)
class JobRequest:
    """What to transcribe and how; ``audio`` is the raw container bytes."""

    model_id: str
    audio: bytes
    options: TranscribeOptions
    separate_model_id: str = ""
    job_id: str = ""
    deadline: float | None = None  # time.monotonic() value
    fast_first_segment: bool | None = None  # None: the service's setting
    diarization: DiarizationRequest | None = None  # None: no speaker labels

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.audio)
        digest.update(repr((self.model_id, self.options, self.separate_model_id, self.fast_first_segment)).encode())
        if self.diarization is not None:
            digest.update(self.diarization.digest())
        return digest.hexdigest()


class Job:
    """One transcription with its bounded, sequenced event log; the log ends with the job."""

    def __init__(self, job_id: str, request: JobRequest, history: int, client_named: bool) -> None:
        self.job_id = job_id
        self.request = request
        self.client_named = client_named
        self.fingerprint = request.fingerprint
        self.state = JobState.QUEUED
        self.cancel_event = threading.Event()
        self.done_event = threading.Event()
        self.error: BaseException | None = None
        self.created = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None
        self.first_segment_at: float | None = None
        self._lock = threading.Lock()
        self._on_cancel: list[Callable[[], None]] = []
        self._log: EventLog[JobEvent] = EventLog(history)

    @property
    def sequence(self) -> int:
        return self._log.sequence

    def emit(self, payload: Payload) -> JobEvent:
        return self._log.append(lambda sequence: JobEvent(sequence, time.time(), payload))

    def events_after(self, sequence: int) -> list[JobEvent] | None:
        """Events with sequence > ``sequence``; None if some already left the history or
        ``sequence`` is past the job's last event."""
        return self._log.events_after(sequence)

    def follow(
        self, after_sequence: int, stop: Sequence[asyncio.Event] = ()
    ) -> AsyncGenerator[Followed[JobEvent], None]:
        """EventLog.follow over the job's events; End comes after the job's last event."""
        return self._log.follow(after_sequence, stop=stop)

    def cancel(self) -> None:
        """Stop the job: ``should_stop`` turns true, and the work it waits for is told at once
        (``on_cancel``: its decodes waiting for a batch leave the queue)."""
        with self._lock:
            self.cancel_event.set()
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the job is cancelled (now, if it was already); returns the undo."""
        with self._lock:
            cancelled = self.cancel_event.is_set()
            if not cancelled:
                self._on_cancel.append(callback)
        if cancelled:
            callback()

        def undo() -> None:
            with self._lock:
                if callback in self._on_cancel:
                    self._on_cancel.remove(callback)

        return undo

    def should_stop(self) -> bool:
        if self.cancel_event.is_set():
            return True
        deadline = self.request.deadline
        return deadline is not None and time.monotonic() > deadline

    def finish(self, state: JobState, error: BaseException | None = None) -> None:
        with self._lock:
            self.state = state
            self.error = error
            self.finished = time.monotonic()
        self.done_event.set()
        self._log.close()


@dataclass
class JobLimits:
    max_running: int = 1
    max_queued: int = 16
    retention_seconds: float = 600.0
    history_events: int = 20_000


class JobManager:
    """Admits jobs (RESOURCE_EXHAUSTED beyond the limits), runs them on a bounded pool,
    keeps ended jobs for ``retention_seconds`` so clients can re-attach."""

    def __init__(self, limits: JobLimits, run: Callable[[Job], None], metrics: InferenceMetrics | None = None) -> None:
        self.limits = limits
        self._run = run
        self.metrics = metrics
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._queued: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: set[str] = set()
        self._pool = ThreadPoolExecutor(limits.max_running, thread_name_prefix="transcribe")
        self._closed = False

    def submit(self, request: JobRequest) -> tuple[Job, bool]:
        """Admit a job, or return the existing one for a repeated client job_id (True)."""
        self._sweep()
        with self._lock:
            if self._closed:
                raise ResourceExhausted("the inference service is shutting down; retry on another instance")
            if request.job_id:
                check_job_id(request.job_id)
                existing = self._jobs.get(request.job_id)
                if existing is not None:
                    if existing.fingerprint != request.fingerprint:
                        raise AlreadyExists(
                            f"job_id {shown(request.job_id)} is already used for different audio or options; pick a new job_id"
                        )
                    return existing, True
            running = len(self._running)
            active = running + len(self._queued)
            if active >= self.limits.max_running + self.limits.max_queued:
                raise ResourceExhausted(
                    f"too many jobs: {running} running and {len(self._queued)} queued "
                    f"(limits {self.limits.max_running} running, {self.limits.max_queued} queued); retry later"
                )
            job_id = request.job_id or uuid.uuid4().hex
            job = Job(job_id, request, self.limits.history_events, client_named=bool(request.job_id))
            self._jobs[job_id] = job
            self._queued[job_id] = job
            position = max(0, active - self.limits.max_running + 1)
        job.emit(Accepted(position, request.model_id))
        with log_context(job_id=job_id, model_id=request.model_id):
            logger.debug("job queued", extra={"phase": "queued", "queue_position": position})
        if position:
            job.emit(Progress(Phase.QUEUED, 0.0, f"{position} job(s) ahead"))
        context = contextvars.copy_context()
        self._pool.submit(context.run, self._execute, job)
        self._update_gauges()
        return job, False

    def get(self, job_id: str) -> Job:
        check_job_id(job_id)
        self._sweep()
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(
                f"no job {shown(job_id)}: it never existed or ended more than {self.limits.retention_seconds:.0f} s ago"
            )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ENDED:
            job.cancel()
            logger.info("job cancel requested", extra={"job_id": job_id})
        return job

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queued)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.state not in ENDED:
                job.cancel()
        self._pool.shutdown(wait=wait, cancel_futures=False)

    def _execute(self, job: Job) -> None:
        with self._lock:
            self._queued.pop(job.job_id, None)
            self._running.add(job.job_id)
            waiting = list(self._queued.values())
        for ahead, waiting_job in enumerate(waiting):
            waiting_job.emit(Progress(Phase.QUEUED, 0.0, f"{ahead} job(s) ahead" if ahead else "next to run"))
        job.started = time.monotonic()
        job.state = JobState.RUNNING
        self._update_gauges()
        outcome = JobState.COMPLETED
        error: BaseException | None = None
        with log_context(job_id=job.job_id, model_id=job.request.model_id):
            logger.debug("job started", extra={"phase": "queued", "seconds": round(job.started - job.created, 3)})
            try:
                if job.should_stop():
                    raise Cancelled("job cancelled before it started")
                self._run(job)
            except Cancelled as exc:
                if job.cancel_event.is_set():
                    outcome, error = JobState.CANCELLED, exc
                else:
                    outcome, error = (
                        JobState.FAILED,
                        DeadlineExceeded("the job ran past the call's deadline and was stopped"),
                    )
            except BaseException as exc:  # noqa: BLE001 - every failure is reported to the job's watchers
                outcome, error = JobState.FAILED, exc
                logger.warning("job failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            if self.metrics is not None:  # counted before the last event: a caller that saw it sees the count
                self.metrics.jobs_finished.labels(outcome.value.lower()).inc()
            job.finish(outcome, error)
            logger.info(
                "job ended", extra={"state": outcome.value, "seconds": round(time.monotonic() - job.started, 3)}
            )
        with self._lock:
            self._running.discard(job.job_id)
        self._update_gauges()

    def _sweep(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [
                job_id
                for job_id, job in self._jobs.items()
                if job.finished is not None and now - job.finished > self.limits.retention_seconds
            ]
            for job_id in expired:
                del self._jobs[job_id]

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            counts: dict[str, int] = dict.fromkeys((s.value.lower() for s in JobState), 0)
            for job in self._jobs.values():
                counts[job.state.value.lower()] += 1
            queued = len(self._queued)
        for state, count in counts.items():
            self.metrics.jobs.labels(state).set(count)
        self.metrics.job_queue_length.set(queued)
