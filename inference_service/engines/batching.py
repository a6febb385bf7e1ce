"""One decode scheduler per loaded Whisper model: the encoder and decoder calls of many jobs run in
shared CTranslate2 batches, and each job gets the result it would get alone.

A job keeps faster-whisper's own sequential logic (prompts from the previous text, temperature
fallback, timestamps, word alignment): it drives a shallow copy of the ``WhisperModel`` whose
``.model`` (the ``ctranslate2.models.Whisper``) is a ``ScheduledWhisper``. Its ``encode`` and
``generate`` become work items on the model's one scheduler thread and block until their batch
ran; ``align`` and ``detect_language`` go to the model directly. A window whose decode fails
faster-whisper's thresholds comes back as a new item at the next temperature while the rest of
its batch has its results already. A decoder call batches only with prompts of one layout, so a
job's previous-text prompts are cut to a multiple of ``prompt_bucket_tokens`` (fixed when the
job opens, decided by its own text alone): windows of different files then share a few layouts.

With a model of two or more CTranslate2 replicas (``num_workers``, weights shared), latency
batches run on a thread of their own, beside a file batch already running: a live decode or a
short request does not wait for a long file's window to finish (a 30 s window's beam-5 decode
takes 1-1.2 s on 2 cores, the 11 s request alone 0.6 s). A file batch starts only when no
latency work waits or runs, nor is about to (a latency job that just got its result has
``FOLLOW_UP_SECONDS`` to send its next call), so a latency call shares the machine with at
most the one file call it found running.

The same follow-up holds on one thread: after a batch served latency jobs, work of a lower rank
(file windows; drafts after a live final) waits up to ``FOLLOW_UP_SECONDS`` for those jobs' next
calls, or each job's own time if it was opened with one (a request's, whose step from its first
utterance to its window takes longer). A job's calls come one after the other (encode, then generate, then its word alignment,
which goes to the model directly), so without it a 30 s file window would start in the gap and
the short job would wait for it a second time.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import enum
import itertools
import logging
import math
import threading
import time
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from faster_whisper import WhisperModel

from inference_service.engines.batch_ops import (
    SOT_PREV_TOKEN,
    SOT_TOKEN,
    EncodeBudget,
    EncodeCall,
    GenerateCall,
    Op,
    batchable,
    bucket_prompt,
    encode_key,
    generate_key,
    host_features,
    run_encode,
    run_generate,
)
from voxserve_common.config import check_settings
from voxserve_common.errors import Cancelled, FailedPrecondition

logger = logging.getLogger(__name__)

# How long file batches hold off after a latency batch, for its jobs' next calls (an encode's
# result becomes a generate call within a few milliseconds of Python).
FOLLOW_UP_SECONDS = 0.02
# A file item that waited this long runs beside latency work (two replicas), so a steady stream
# of live decodes or short requests slows the long files down but never stops them.
FILE_PATIENCE_SECONDS = 2.0


class Lane(enum.IntEnum):
    """Who goes first: latency-bound decodes (live buffers, a file's first utterance) before file windows."""

    LATENCY = 0
    FILE = 1


@dataclass(frozen=True)
class BatchSettings:
    """``batch_size`` items at most per CTranslate2 call; when fewer are ready, wait up to
    ``batch_window_ms`` after the oldest one arrived for more (0 = never wait).
    ``prompt_bucket_tokens``: the previous text of each prompt is cut to a multiple of this many
    tokens (``batch_ops.bucket_prompt``) in the jobs opened from then on; 0 keeps faster-whisper's
    prompts exactly.

    Raises:
        ConfigError: batch_size below 1, batch_window_ms negative or not a finite number, or
            prompt_bucket_tokens negative; the message names the field.
    """

    batch_size: int
    batch_window_ms: float
    prompt_bucket_tokens: int = 0

    def __post_init__(self) -> None:
        window = self.batch_window_ms
        check_settings(
            self,
            [
                (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size", "must be an integer >= 1"),
                (
                    isinstance(window, (int, float)) and math.isfinite(window) and window >= 0,
                    "batch_window_ms",
                    "must be a number >= 0 (0 = never wait for more work)",
                ),
                (
                    isinstance(self.prompt_bucket_tokens, int) and self.prompt_bucket_tokens >= 0,
                    "prompt_bucket_tokens",
                    "must be an integer >= 0 (0 = faster-whisper's prompts as they are)",
                ),
            ],
        )


@dataclass(frozen=True)
class BatchReport:
    """One CTranslate2 call, for metrics and a span (``links``: the served jobs' span contexts)."""

    model_id: str
    op: str
    lanes: tuple[Lane, ...]
    jobs: tuple[str, ...]  # the job key of each item, in batch order
    waited_seconds: tuple[float, ...]  # from submission to the start of this call, per item
    started_ns: int  # time.time_ns() when the call started, and when it ended
    ended_ns: int
    links: tuple[object, ...] = ()
    error: str | None = None

    @property
    def size(self) -> int:
        return len(self.jobs)

    @property
    def seconds(self) -> float:
        return (self.ended_ns - self.started_ns) / 1e9


class BatchObserver(Protocol):
    """Where metrics and spans come from; called on the scheduler thread, so it must be quick."""

    def batch_done(self, report: BatchReport) -> None: ...

    def waiting_changed(self, model_id: str, waiting: int) -> None: ...


class NullObserver:
    def batch_done(self, report: BatchReport) -> None:
        pass

    def waiting_changed(self, model_id: str, waiting: int) -> None:
        pass


@dataclass(eq=False)
class _Item:
    op: Op
    key: Hashable
    job: BatchedJob
    call: EncodeCall | GenerateCall
    tag: CallTag | None = None
    submitted: float = field(default_factory=time.monotonic)
    future: Future[Any] = field(default_factory=Future)


@dataclass(eq=False)
class CallTag:
    """What one decode of a job says about the calls it makes (``tagged_calls``): ``urgent`` ones
    (a live final's) go before the rest of their lane in batches of their own; once ``withdrawn``
    (``DecodeScheduler.withdraw``: a live draft overtaken by a final) its waiting calls leave and
    its later ones fail with Cancelled, while the job's other decodes go on."""

    urgent: bool = False
    withdrawn: bool = False


_call_tag: contextvars.ContextVar[CallTag | None] = contextvars.ContextVar("voxserve_decode_call_tag", default=None)


@contextlib.contextmanager
def tagged_calls(tag: CallTag) -> Iterator[CallTag]:
    """The model calls made inside (on this thread or context) carry ``tag``."""
    token = _call_tag.set(tag)
    try:
        yield tag
    finally:
        _call_tag.reset(token)


def _urgent(item: _Item) -> bool:
    return item.tag is not None and item.tag.urgent


def _rank(item: _Item) -> int:
    """Who goes first: a live final's calls (0), other latency calls (1), file windows (2)."""
    if item.job.lane is Lane.FILE:
        return 2
    return 0 if _urgent(item) else 1


class BatchedJob:
    """One job's handle on a scheduler. ``model`` is a faster-whisper model to drive as usual
    (``transcribe``, or the live decoder's own calls); its encoder and decoder calls go through
    the scheduler in this job's lane. Close it when the job ends (a context manager).
    ``prompt_bucket``: its prompts' previous text is cut to a multiple of this many tokens (0: not
    cut); fixed when the job opens, so a reload never changes a running job's words."""

    def __init__(
        self,
        scheduler: DecodeScheduler,
        key: str,
        lane: Lane,
        link: object | None,
        follow_up_seconds: float,
        prompt_bucket: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.key = key
        self.lane = lane
        self.link = link
        self.follow_up_seconds = follow_up_seconds
        self.prompt_bucket = prompt_bucket
        self.cancelled = False
        self.closed = False
        self.model: WhisperModel = copy.copy(scheduler.whisper_model)
        self.model.model = ScheduledWhisper(scheduler.whisper_model.model, self)

    def cancel(self) -> None:
        """This job's waiting items fail with Cancelled at once, and so do its later calls."""
        self.scheduler.cancel_jobs([self])

    def move_to(self, lane: Lane) -> None:
        """This job's later calls go in ``lane`` (a request's first utterance is latency-bound;
        its windows are too only if it fits one window)."""
        self.scheduler.move_job(self, lane)

    def close(self) -> None:
        self.scheduler.close_job(self)

    def __enter__(self) -> BatchedJob:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScheduledWhisper:
    """Stands in for a ``ctranslate2.models.Whisper`` inside one job's ``WhisperModel`` copy.

    Calls of one window (``encode`` of ``(1, n_mels, frames)``, ``generate`` with one prompt) go
    through the scheduler; calls that are batches already, asynchronous ones and everything else
    (``align``, ``detect_language``, ``is_multilingual``, ``device``...) go to the model as they are.
    """

    def __init__(self, model: Any, job: BatchedJob) -> None:
        self._model = model
        self._job = job

    def encode(self, features: Any, to_cpu: bool = False) -> Any:
        array = host_features(features)
        if array.shape[0] != 1:
            return self._model.encode(features, to_cpu=to_cpu)
        return self._job.scheduler.submit(self._job, Op.ENCODE, EncodeCall(array, to_cpu))

    def generate(self, features: Any, prompts: Sequence[Sequence[Any]], **options: Any) -> list[Any]:
        if options.get("asynchronous") or len(prompts) != 1 or features.shape[0] != 1:
            return list(self._model.generate(features, prompts, **options))
        scheduler = self._job.scheduler
        prompt = scheduler.bucketed(prompts[0], self._job.prompt_bucket)
        return [scheduler.submit(self._job, Op.GENERATE, GenerateCall(features, prompt, options))]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class DecodeScheduler:
    """Runs the encoder/decoder calls of every job of one Whisper model in batches, on one thread
    (two when the model has two replicas: one for latency batches, one for file batches).

    A batch is the oldest latency item's group if any latency item waits (urgent calls, a live
    final's, first and in batches of their own: ``CallTag``), else the oldest file item's; a
    group is the items with equal keys (``batch_ops``: op, input shape, prompt layout, decoding
    options) within one lane, in arrival order, at most one item per file job, up to
    ``batch_size``. With fewer ready, the scheduler waits up to ``batch_window_ms`` after the
    oldest one arrived, unless every open job that could add to it has an item waiting already.
    """

    def __init__(
        self,
        model_id: str,
        whisper_model: WhisperModel,
        settings: BatchSettings,
        observer: BatchObserver | None = None,
        follow_up_seconds: float = FOLLOW_UP_SECONDS,
        file_patience_seconds: float = FILE_PATIENCE_SECONDS,
        encode_budget: EncodeBudget | None = None,
    ) -> None:
        self.model_id = model_id
        self.encode_budget = encode_budget
        self.follow_up_seconds = follow_up_seconds
        self.file_patience_seconds = file_patience_seconds
        self.whisper_model = whisper_model
        self.settings = settings
        self.observer: BatchObserver = observer or NullObserver()
        self._sot_id = int(whisper_model.hf_tokenizer.token_to_id(SOT_TOKEN))
        self._sot_prev_id = int(whisper_model.hf_tokenizer.token_to_id(SOT_PREV_TOKEN))
        # faster-whisper keeps the last max_length // 2 - 1 tokens of the previous text (223).
        self._prompt_cap = int(whisper_model.max_length) // 2 - 1
        self._batchable = batchable(whisper_model.model)
        if not self._batchable:
            logger.warning("model outputs cannot be stacked (bfloat16): every call runs alone")
        self._alone = itertools.count()
        self._cond = threading.Condition()
        self._waiting: list[_Item] = []
        self._jobs: set[BatchedJob] = set()
        self._closed = False
        self._latency_running = 0
        # Latency jobs a batch just served, with their rank and until when: work of a lower rank
        # waits for their next call.
        self._follow_up: dict[BatchedJob, tuple[int, float]] = {}
        self.lanes_apart = int(getattr(whisper_model.model, "num_workers", 1)) >= 2
        executors: tuple[Lane | None, ...] = (Lane.LATENCY, Lane.FILE) if self.lanes_apart else (None,)
        self._threads = [
            threading.Thread(
                target=self._loop,
                args=(lane,),
                name=f"decode-scheduler-{model_id}" + ("" if lane is None else f"-{lane.name.lower()}"),
                daemon=True,
            )
            for lane in executors
        ]
        for thread in self._threads:
            thread.start()

    def open_job(
        self,
        key: str,
        lane: Lane,
        link: object | None = None,
        follow_up_seconds: float | None = None,
        keep_prompt_text: bool = False,
    ) -> BatchedJob:
        """A handle for one job (``key``: its job id, which ``cancel`` names; ``link``: its span
        context, handed to the observer with every batch that served it; ``follow_up_seconds``:
        how long lower-ranked work waits for its next call after a latency batch served it,
        the scheduler's own by default; ``keep_prompt_text``: its prompts hold the caller's own
        text (an initial prompt, hotwords), which is never cut to a bucket).

        Raises:
            FailedPrecondition: the scheduler was closed (its model evicted or unloaded).
        """
        with self._cond:
            self._check_open()
            hold = self.follow_up_seconds if follow_up_seconds is None else follow_up_seconds
            bucket = 0 if keep_prompt_text else self.settings.prompt_bucket_tokens
            job = BatchedJob(self, key, lane, link, hold, bucket)
            self._jobs.add(job)
        return job

    def bucketed(self, prompt: Sequence[Any], step: int) -> list[Any]:
        """``prompt`` with its previous text cut to a multiple of ``step`` tokens (``bucket_prompt``)."""
        return bucket_prompt(prompt, self._sot_id, self._sot_prev_id, step, self._prompt_cap)

    def move_job(self, job: BatchedJob, lane: Lane) -> None:
        with self._cond:
            job.lane = lane
            self._cond.notify_all()

    def close_job(self, job: BatchedJob) -> None:
        with self._cond:
            job.closed = True
            self._jobs.discard(job)
            self._cond.notify_all()  # one job fewer to wait for

    def cancel(self, key: str) -> int:
        """Cancel every open job with this key: its waiting items leave the queue at once and fail
        with Cancelled (a batch already running still finishes). Returns how many items left."""
        with self._cond:
            jobs = [job for job in self._jobs if job.key == key]
        return self.cancel_jobs(jobs)

    def cancel_jobs(self, jobs: Sequence[BatchedJob]) -> int:
        with self._cond:
            for job in jobs:
                job.cancelled = True
        return self._drop_cancelled()

    def withdraw(self, tag: CallTag) -> int:
        """The calls tagged ``tag`` leave: waiting ones fail with Cancelled at once, later ones
        too (a batch already running still finishes). Returns how many items left."""
        with self._cond:
            tag.withdrawn = True
        return self._drop_cancelled()

    def _drop_cancelled(self) -> int:
        def gone(item: _Item) -> bool:
            return item.job.cancelled or (item.tag is not None and item.tag.withdrawn)

        with self._cond:
            removed = [item for item in self._waiting if gone(item)]
            self._waiting = [item for item in self._waiting if not gone(item)]
            waiting = len(self._waiting)
            self._cond.notify_all()
        for item in removed:
            item.future.set_exception(Cancelled(f"job {item.job.key} was cancelled"))
        if removed:
            self._waiting_changed(waiting)
        return len(removed)

    def set_settings(self, settings: BatchSettings) -> None:
        """New batch size and window, in force from the next batch (a SIGHUP reload)."""
        with self._cond:
            self.settings = settings
            self._cond.notify_all()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        """Stop the thread after the batch that runs now; waiting items fail with FailedPrecondition."""
        with self._cond:
            self._closed = True
            removed, self._waiting = self._waiting, []
            self._cond.notify_all()
        for item in removed:
            item.future.set_exception(self._closed_error())
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def submit(self, job: BatchedJob, op: Op, call: EncodeCall | GenerateCall) -> Any:
        """Queue one call for ``job`` and wait for its result.

        Raises:
            Cancelled: the job was cancelled before or while the call waited or ran.
            FailedPrecondition: the job or the scheduler was closed.
            Exception: what CTranslate2 raised for this call (run alone after a failed batch).
        """
        item = _Item(op, self._key(op, call), job, call, _call_tag.get())
        with self._cond:
            self._check_open()
            if job.cancelled or (item.tag is not None and item.tag.withdrawn):
                raise Cancelled(f"job {job.key} was cancelled")
            if job.closed:
                raise FailedPrecondition(f"job {job.key} is closed; open another one")
            self._waiting.append(item)
            waiting = len(self._waiting)
            self._cond.notify_all()
        self._waiting_changed(waiting)
        result = item.future.result()
        if job.cancelled or (item.tag is not None and item.tag.withdrawn):
            raise Cancelled(f"job {job.key} was cancelled")
        return result

    def _key(self, op: Op, call: EncodeCall | GenerateCall) -> Hashable:
        key: Hashable | None = None
        if self._batchable:
            key = encode_key(call) if isinstance(call, EncodeCall) else generate_key(call, self._sot_id)
        return key if key is not None else (op, "alone", next(self._alone))

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _closed_error(self) -> FailedPrecondition:
        return FailedPrecondition(f"whisper model {self.model_id!r} was closed; load it again")

    # ----------------------------------------------------------------------- the thread

    def _loop(self, lane: Lane | None) -> None:
        """One executor: every batch (``lane`` None), or only the batches headed by ``lane``'s items."""
        while (batch := self._next_batch(lane)) is not None:
            try:
                self._run(batch)
            except Exception as exc:  # never leave a job waiting on a future nobody sets
                logger.exception("decode batch failed unexpectedly", extra={"model_id": self.model_id})
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                self._batch_done(batch)

    def _batch_done(self, batch: list[_Item]) -> None:
        """Count a latency batch off and hold lower-ranked work for the next calls of the latency jobs it served."""
        now = time.monotonic()
        served = {
            item.job: (_rank(item), now + item.job.follow_up_seconds) for item in batch if item.job.lane is Lane.LATENCY
        }
        with self._cond:
            if batch[0].job.lane is Lane.LATENCY:
                self._latency_running -= 1
            if served:
                self._follow_up = served
            self._cond.notify_all()

    def _next_batch(self, lane: Lane | None) -> list[_Item] | None:
        """The next batch to run, taken off the queue; None once the scheduler is closed."""
        with self._cond:
            batch = self._ready_batch(lane)
            while batch is None and not self._closed:
                self._cond.wait(self._wait_seconds(lane))
                batch = self._ready_batch(lane)
            if batch is None:
                return None
            taken = set(map(id, batch))
            self._waiting = [item for item in self._waiting if id(item) not in taken]
            for item in batch:  # their next call came
                self._follow_up.pop(item.job, None)
            waiting = len(self._waiting)
            if batch[0].job.lane is Lane.LATENCY:
                self._latency_running += 1
        self._waiting_changed(waiting)
        return batch

    def _ready_batch(self, lane: Lane | None) -> list[_Item] | None:
        """The head's group if it should run now (full, waited long enough, or no one else could add to it)."""
        head = self._head(lane)
        if head is None or self._closed:
            return None
        batch = self._gather(head)
        if len(batch) >= self._most_items(head) or self._everyone_waits(head.job.lane):
            return batch
        return batch if self._window_left(head) <= 0 else None

    def _wait_seconds(self, lane: Lane | None) -> float | None:
        head = self._head(lane)
        if head is not None:
            return max(0.0, self._window_left(head))
        now = time.monotonic()
        waits = [until - now for _, until in self._holds()]
        if lane is Lane.FILE:
            oldest = self._oldest_file_item()
            if oldest is not None:  # held back by latency work: until its patience runs out
                waits.append(oldest.submitted + self.file_patience_seconds - now)
        return max(0.0, min(waits)) if waits else None

    def _head(self, lane: Lane | None = None) -> _Item | None:
        """The oldest urgent latency item, else the oldest latency item, else the oldest item, unless
        a job just served at a higher rank has yet to send its next call; for the file executor, the
        oldest file item once no latency work waits, runs or is about to (or it ran out of patience)."""
        latency = [item for item in self._waiting if item.job.lane is Lane.LATENCY]
        if lane is Lane.FILE:
            oldest = self._oldest_file_item()
            if oldest is None:
                return None
            patient = time.monotonic() - oldest.submitted < self.file_patience_seconds
            if patient and (latency or self._latency_running or self._held_rank() is not None):
                return None
            return oldest
        if latency:
            head: _Item | None = min(latency, key=_rank)  # min keeps the first of equals
        else:
            head = None if lane is Lane.LATENCY or not self._waiting else self._waiting[0]
        held = self._held_rank()
        if head is None or (held is not None and _rank(head) > held):
            return None
        return head

    def _oldest_file_item(self) -> _Item | None:
        return next((item for item in self._waiting if item.job.lane is Lane.FILE), None)

    def _held_rank(self) -> int | None:
        """The best rank among latency jobs served a moment ago that are still open and have not
        sent their next call yet; None when there is none (or their time is up)."""
        return min((rank for rank, _ in self._holds()), default=None)

    def _holds(self) -> list[tuple[int, float]]:
        """(rank, until) of each job the last latency batch served that still holds lower-ranked
        work: open, its next call not sent, its own follow-up time not over."""
        now = time.monotonic()
        waiting = {item.job for item in self._waiting}
        return [
            (rank, until)
            for job, (rank, until) in self._follow_up.items()
            if until > now and not job.closed and not job.cancelled and job not in waiting
        ]

    def _gather(self, head: _Item) -> list[_Item]:
        """The head's group: items of its lane with its key in arrival order, at most one per file
        job. A latency batch takes no file window: on 2 CPU cores an 11 s request's encode took
        0.53 s with one beside it instead of 0.25 s."""
        batch = [head]
        file_jobs = {head.job}
        most = self._most_items(head)
        for item in self._waiting:
            if len(batch) >= most:
                break
            if item is head or item.key != head.key or item.job.lane is not head.job.lane:
                continue
            if _urgent(head) and not _urgent(item):
                continue  # a final is not slowed down by drafts joining its batch
            if item.job.lane is Lane.FILE:
                if item.job in file_jobs:
                    continue
                file_jobs.add(item.job)
            batch.append(item)
        return batch

    def _most_items(self, head: _Item) -> int:
        """``batch_size``, or fewer for encoder windows past the CPU's cache (``EncodeBudget``)."""
        if self.encode_budget is None or not isinstance(head.call, EncodeCall):
            return self.settings.batch_size
        return min(self.settings.batch_size, self.encode_budget.windows(head.call.features.shape[-1]))

    def _everyone_waits(self, lane: Lane) -> bool:
        """Every open job that could join this lane's batch has an item waiting already."""
        busy = {item.job for item in self._waiting}
        return all(job in busy for job in self._jobs if not job.cancelled and job.lane is lane)

    def _window_left(self, head: _Item) -> float:
        return head.submitted + self.settings.batch_window_ms / 1000 - time.monotonic()

    def _run(self, batch: list[_Item]) -> None:
        """One CTranslate2 call for the batch; when it fails, each item runs alone, so one bad
        item fails only its own job."""
        started, clock = time.time_ns(), time.monotonic()
        waited = tuple(clock - item.submitted for item in batch)
        error: BaseException | None = None
        try:
            results = self._execute(batch)
        except Exception as exc:  # noqa: BLE001 - handed to the job that asked
            if len(batch) > 1:
                logger.warning("decode batch of %d failed (%s); running its items alone", len(batch), exc)
                for item in batch:
                    self._run([item])
                return
            error, results = exc, []
        ended = time.time_ns()
        if error is not None:
            batch[0].future.set_exception(error)
        for item, result in zip(batch, results, strict=False):
            item.future.set_result(result)
        self._report(batch, waited, started, ended, error)

    def _execute(self, batch: list[_Item]) -> list[Any]:
        model = self.whisper_model.model
        if batch[0].op is Op.ENCODE:
            return run_encode(model, [item.call for item in batch if isinstance(item.call, EncodeCall)])
        return run_generate(model, [item.call for item in batch if isinstance(item.call, GenerateCall)])

    def _report(
        self, batch: list[_Item], waited: tuple[float, ...], started: int, ended: int, error: BaseException | None
    ) -> None:
        jobs = {id(item.job): item.job for item in batch}.values()
        links = tuple(job.link for job in jobs if job.link is not None)
        report = BatchReport(
            model_id=self.model_id,
            op=batch[0].op.value,
            lanes=tuple(item.job.lane for item in batch),
            jobs=tuple(item.job.key for item in batch),
            waited_seconds=waited,
            started_ns=started,
            ended_ns=ended,
            links=links,
            error=None if error is None else f"{type(error).__name__}: {error}",
        )
        try:
            self.observer.batch_done(report)
        except Exception:
            logger.exception("batch observer failed", extra={"model_id": self.model_id})

    def _waiting_changed(self, waiting: int) -> None:
        try:
            self.observer.waiting_changed(self.model_id, waiting)
        except Exception:
            logger.exception("batch observer failed", extra={"model_id": self.model_id})
