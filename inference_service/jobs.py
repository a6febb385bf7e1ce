"""Transcription jobs: admission control, per-job event history, cancel, retention.

Each job records its events (accepted, progress, info, segment, completed) with a per-job
sequence, so a client that lost its stream re-attaches with WatchJob(after_sequence) and
gets every remaining event exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import enum
import hashlib
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from inference_service.engines.whisper import Segment, TranscribeOptions, TranscriptionInfo
from inference_service.job_retention import RetainedJobs, RetentionLimits
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
    VoxserveError,
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


# What a job keeps after it ended, for the retention's byte limit. Measured with tracemalloc
# (5000 of each): a Job with an empty log 4.35 kB (its locks, events, deque); an event without
# its strings 296 B (Progress) to 383 B (Segment); a Word 162 B besides its string.
JOB_BYTES = 4500
EVENT_BYTES = 400
WORD_BYTES = 170


def event_bytes(payload: Payload) -> int:
    """Estimated memory of one event: its objects and numbers, its strings and words."""
    nbytes = EVENT_BYTES
    if isinstance(payload, Segment):
        nbytes += sys.getsizeof(payload.text)
        nbytes += sum(WORD_BYTES + sys.getsizeof(word.word) for word in payload.words)
    elif isinstance(payload, Completed):
        nbytes += sys.getsizeof(payload.text)
    elif isinstance(payload, Progress):
        nbytes += sys.getsizeof(payload.message)
    return nbytes


def without_tracebacks(error: BaseException) -> BaseException:
    """``error`` with no traceback on it or on its causes: a traceback keeps its frames' locals
    alive (a failed job's decoded audio) for as long as the job is kept."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return error


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

    def emit_unless_ended(self, payload: Payload) -> None:
        """``emit`` from outside the job's run (its queue position), which may race its end."""
        with self._lock:
            if self.finished is None:
                self.emit(payload)

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
        """End the job: its log closes, and it lets go of its audio (the request's bytes and known
        speakers' clips; the decoded arrays went with the run, and with ``error``'s traceback,
        dropped here)."""
        with self._lock:
            self.state = state
            self.error = None if error is None else without_tracebacks(error)
            self.finished = time.monotonic()
            diarization = self.request.diarization
            self.request = dataclasses.replace(
                self.request, audio=b"", diarization=None if diarization is None else diarization.without_clips()
            )
            self._on_cancel.clear()
        self.done_event.set()
        self._log.close()

    def error_for_caller(self) -> BaseException | None:
        """A copy of the job's error for one caller to raise: raising the kept error itself would
        tie that caller's frames (and its request's audio) to the job for as long as it is kept."""
        error = self.error
        if error is None:
            return None
        try:
            copy = type(error).__new__(type(error), *error.args)
            copy.__dict__.update(error.__dict__)
        except Exception:  # noqa: BLE001 - an exception type that cannot be copied is raised itself
            return error
        return copy

    def held_bytes(self) -> int:
        """Estimated memory the job holds: its record, its audio (and known speakers' clips) until
        it ends, its events."""
        events = sum(event_bytes(event.payload) for event in self._log.history())
        clips = self.request.diarization.clip_bytes if self.request.diarization is not None else 0
        return JOB_BYTES + len(self.request.audio) + clips + events


# The timer's sweep of expired ended jobs: retention is minutes, so a second late costs nothing,
# and a sweep looks only at the jobs it evicts (they are kept in the order they ended).
SWEEP_INTERVAL_SECONDS = 1.0

# After a burst of jobs glibc keeps the heap they freed: 8 clients x 50 calls of 3.2 s left
# ~120 MiB of 650 resident that a malloc_trim handed back (646 -> 526 MiB), and the amount
# crept up as more threads' arenas reached their peaks (+0.7 % to +4.1 % RSS over 100 more
# calls on the 2-core VM, nothing of it held by the service). So once no job has been queued
# or running for this long, ``on_idle`` (the app: malloc_trim) runs, once per quiet spell:
# never under a running decode (trimming after every large free made a transcription 33 %
# slower, see memory.py); the next burst's first jobs fault their pages in again (not measured).
IDLE_SECONDS_BEFORE_RELEASE = 2.0


@dataclass
class JobLimits:
    max_running: int = 1
    max_queued: int = 16
    history_events: int = 20_000
    retention: RetentionLimits = field(default_factory=RetentionLimits)


class JobManager:
    """Admits jobs (RESOURCE_EXHAUSTED beyond the limits), runs them on a bounded pool, and keeps
    ended jobs (their events, not their audio) within the retention limits so clients can
    re-attach. A job cancelled while queued ends at once and frees its place."""

    def __init__(
        self,
        limits: JobLimits,
        run: Callable[[Job], None],
        metrics: InferenceMetrics | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.limits = limits
        self._run = run
        self.metrics = metrics
        self._on_idle = on_idle
        self._last_end: float | None = None  # time.monotonic() of the last job end not followed by on_idle
        self._lock = threading.Lock()
        self._active: dict[str, Job] = {}  # queued and running
        self._queued: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: set[str] = set()
        self._retained: RetainedJobs[Job] = RetainedJobs(limits.retention, metrics)
        self._pool = ThreadPoolExecutor(limits.max_running, thread_name_prefix="transcribe")
        self._closed = False
        self._stop_sweeping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_every, name="job-retention", daemon=True)
        self._sweeper.start()

    def submit(self, request: JobRequest) -> tuple[Job, bool]:
        """Admit a job, or return the existing one for a repeated client job_id (True)."""
        self._expire()
        with self._lock:
            if self._closed:
                raise ResourceExhausted("the inference service is shutting down; retry on another instance")
            if request.job_id:
                check_job_id(request.job_id)
                existing = self._find(request.job_id)
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
            self._active[job_id] = job
            self._queued[job_id] = job
            position = max(0, active - self.limits.max_running + 1)
        job.emit(Accepted(position, request.model_id))
        with log_context(job_id=job_id, model_id=request.model_id):
            logger.debug("job queued", extra={"phase": "queued", "queue_position": position})
        if position:
            job.emit(Progress(Phase.QUEUED, 0.0, f"{position} job(s) ahead"))
        job.on_cancel(lambda: self._drop_queued(job))  # a no-op once it runs
        context = contextvars.copy_context()
        self._pool.submit(context.run, self._execute, job)
        self._update_gauges()
        return job, False

    def get(self, job_id: str) -> Job:
        check_job_id(job_id)
        self._expire()
        with self._lock:
            job = self._find(job_id)
        if job is None:
            raise NotFound(
                f"no job {shown(job_id)}: it never existed, or it ended and is no longer kept (ended jobs are kept "
                f"within {self.limits.retention.describe()})"
            )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in ENDED:
            job.cancel()
            logger.info("job cancel requested", extra={"job_id": job_id})
        return job

    def set_retention(self, limits: RetentionLimits) -> None:
        """New retention limits, in force at once (a SIGHUP reload): ended jobs beyond them go now."""
        with self._lock:
            self.limits = dataclasses.replace(self.limits, retention=limits)
            self._retained.set_limits(limits, time.monotonic())
        self._update_gauges()

    def jobs(self) -> list[Job]:
        """Every job known now: queued, running, and ended ones still kept."""
        with self._lock:
            return [*self._active.values(), *self._retained.items()]

    def queue_length(self) -> int:
        with self._lock:
            return len(self._queued)

    def close(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self._active.values())
        for job in jobs:
            if job.state not in ENDED:
                job.cancel()
        self._stop_sweeping.set()
        self._sweeper.join()
        self._pool.shutdown(wait=wait, cancel_futures=False)

    def _find(self, job_id: str) -> Job | None:
        """The job, running, queued or kept after its end (call under the lock)."""
        return self._active.get(job_id) or self._retained.get(job_id)

    def _drop_queued(self, job: Job) -> None:
        """A job cancelled while it waits (its client left, CancelJob) ends now, so its place goes
        to the next caller at once; its pool item finds it gone. A running job ends as its run stops."""
        with self._lock:
            if self._queued.pop(job.job_id, None) is None:
                return
            waiting = list(self._queued.values())
        self._end(job, JobState.CANCELLED, Cancelled("job cancelled while queued"))
        _announce_positions(waiting)

    def _execute(self, job: Job) -> None:
        with self._lock:
            if self._queued.pop(job.job_id, None) is None:
                return  # cancelled while queued: it ended then
            self._running.add(job.job_id)
            waiting = list(self._queued.values())
        _announce_positions(waiting)
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
            except BaseException as exc:  # every failure is reported to the job's watchers
                outcome, error = JobState.FAILED, exc
                # An unexpected error's traceback is logged here: the job keeps the error without it.
                unexpected = not isinstance(exc, VoxserveError)
                logger.warning("job failed", extra={"error": f"{type(exc).__name__}: {exc}"}, exc_info=unexpected)
        self._end(job, outcome, error)

    def _end(self, job: Job, outcome: JobState, error: BaseException | None) -> None:
        """Finish the job (its audio goes) and keep it, within the retention limits, for WatchJob."""
        with log_context(job_id=job.job_id, model_id=job.request.model_id):
            if self.metrics is not None:  # counted before the last event: a caller that saw it sees the count
                self.metrics.jobs_finished.labels(outcome.value.lower()).inc()
            job.finish(outcome, error)
            since = job.started if job.started is not None else job.created
            logger.info("job ended", extra={"state": outcome.value, "seconds": round(time.monotonic() - since, 3)})
        nbytes = job.held_bytes()
        with self._lock:
            self._running.discard(job.job_id)
            self._active.pop(job.job_id, None)
            self._retained.add(job.job_id, job, nbytes, time.monotonic())
            self._last_end = time.monotonic()
        self._update_gauges()

    def _sweep_every(self) -> None:
        while not self._stop_sweeping.wait(SWEEP_INTERVAL_SECONDS):
            try:
                self._expire()
                self._release_when_idle()
            except Exception:  # the sweep must outlive any one failure (logged with its traceback)
                logger.exception("retention sweep failed")

    def _release_when_idle(self) -> None:
        """Run ``on_idle`` once jobs ended and none was queued or running for a while."""
        with self._lock:
            quiet = (
                self._on_idle is not None
                and not self._active
                and self._last_end is not None
                and time.monotonic() - self._last_end >= IDLE_SECONDS_BEFORE_RELEASE
            )
            if quiet:
                self._last_end = None
        if quiet and self._on_idle is not None:
            self._on_idle()

    def _expire(self) -> None:
        with self._lock:
            evicted = self._retained.expire(time.monotonic())
        if evicted:
            self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            counts: dict[str, int] = dict.fromkeys((s.value.lower() for s in JobState), 0)
            for job in (*self._active.values(), *self._retained.items()):
                counts[job.state.value.lower()] += 1
            queued = len(self._queued)
        for state, count in counts.items():
            self.metrics.jobs.labels(state).set(count)
        self.metrics.job_queue_length.set(queued)


def _announce_positions(waiting: list[Job]) -> None:
    """Tell each queued job its place after one left the queue."""
    for ahead, job in enumerate(waiting):
        job.emit_unless_ended(Progress(Phase.QUEUED, 0.0, f"{ahead} job(s) ahead" if ahead else "next to run"))
