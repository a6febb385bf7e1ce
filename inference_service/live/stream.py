"""The driver of one live stream: audio in from the client, decodes on the shared worker, events out.

Everything here runs on the server's event loop except the decodes (on a DecodeWorker thread,
their model calls batched with other work by the model's decode scheduler). The session is
touched only from the loop, so it needs no lock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from inference_service.audio import FloatArray
from inference_service.engines.batching import BatchedJob, CallTag, tagged_calls
from inference_service.engines.buffer_decoder import BufferDecoder, Hypothesis
from inference_service.engines.speech_detector import SpeechDetector
from inference_service.live.pcm import PcmDecoder
from inference_service.live.session import DecodeJob, LiveEvent, LiveResult, LiveSession, SpeechEvent
from inference_service.live.worker import DRAFT, FINAL, DecodeWorker
from inference_service.payloads import Accepted, Completed
from voxserve_common.errors import ResourceExhausted

logger = logging.getLogger(__name__)

Payload = Accepted | LiveResult | SpeechEvent | Completed


@dataclass(frozen=True)
class StreamEvent:
    """One response of a live stream, with where the stream stood when it was sent."""

    sequence: int
    timestamp: float
    audio_received: float
    audio_processed: float
    payload: Payload


@dataclass
class StreamStats:
    """Counts of one stream, for its Completed message and logs."""

    decodes: int = 0
    decode_seconds: float = 0.0
    finals: int = 0
    drafts: int = 0
    drafts_dropped: int = 0  # draft decodes overtaken by a final's (their results never applied)
    rewrites: int = 0
    first_result_latency: float | None = None


class StreamObserver(Protocol):
    """Where a stream reports its measurements (the service's metrics)."""

    def first_result(self, seconds: float) -> None: ...

    def final_result(self, latency: float) -> None: ...

    def draft_rewritten(self) -> None: ...

    def draft_dropped(self) -> None: ...

    def decoded(self, seconds: float, lag: float) -> None: ...


class NoObserver:
    def first_result(self, seconds: float) -> None:
        pass

    def final_result(self, latency: float) -> None:
        pass

    def draft_rewritten(self) -> None:
        pass

    def draft_dropped(self) -> None:
        pass

    def decoded(self, seconds: float, lag: float) -> None:
        pass


class ArrivalClock:
    """Wall time at which each stream time arrived, to measure a result's latency from its audio end."""

    def __init__(self) -> None:
        self._marks: collections.deque[tuple[float, float]] = collections.deque()

    def mark(self, stream_time: float, wall: float) -> None:
        self._marks.append((stream_time, wall))

    def arrival(self, stream_time: float) -> float | None:
        """When audio up to ``stream_time`` had arrived; forgets marks before it (bounded memory)."""
        while len(self._marks) > 1 and self._marks[1][0] <= stream_time:
            self._marks.popleft()
        for mark_time, wall in self._marks:
            if mark_time >= stream_time:
                return wall
        return self._marks[-1][1] if self._marks else None


class LiveStream:
    """Runs one stream until the client half-closes (flush, then Completed) or goes away."""

    def __init__(
        self,
        session: LiveSession,
        pcm: PcmDecoder,
        detector: SpeechDetector,
        decoder: BufferDecoder,
        worker: DecodeWorker,
        abandon_lag: float,
        observer: StreamObserver | None = None,
        batch: BatchedJob | None = None,
    ) -> None:
        self.session = session
        self.pcm = pcm
        self.detector = detector
        self.decoder = decoder
        self.worker = worker
        self.abandon_lag = abandon_lag
        self.observer: StreamObserver = observer or NoObserver()
        self.batch = batch  # the decoder's handle on the scheduler: a final's calls go first
        self.stats = StreamStats()
        self.clock = ArrivalClock()
        self._sequence = 0
        self._wake = asyncio.Event()
        self._outbox: list[LiveEvent] = []
        self._ended = False
        self._speech_arrival: float | None = None
        self._last_draft: dict[str, str] = {}
        self.in_flight: Future[Hypothesis] | None = None
        self._in_flight_job: DecodeJob | None = None
        self._in_flight_tag: CallTag | None = None
        self._dropped: list[Future[Hypothesis]] = []  # drafts dropped for a final, maybe still running
        self._behind = False  # more than max_lag behind: decoding less often (logged when it changes)

    def event(self, payload: Payload) -> StreamEvent:
        self._sequence += 1
        return StreamEvent(self._sequence, time.time(), self.session.received, self.session.processed, payload)

    async def run(self, audio: AsyncIterator[bytes]) -> AsyncIterator[StreamEvent]:
        """Events of the stream after Accepted, ending with the flush's final results.

        Raises ResourceExhausted when processing falls ``abandon_lag`` seconds behind the
        audio, and whatever reading the audio raised (InvalidArgument for a bad message).
        """
        reader = asyncio.create_task(self._read(audio))
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                for payload in self._drain():
                    yield self.event(payload)
                self._drop_draft_for_final()
                if self.in_flight is None:
                    for payload in self._track(self.session.settle()):
                        yield self.event(payload)
                    if not self._start_decode(loop) and self._ended:
                        return
                if self.session.lag > self.abandon_lag:
                    raise ResourceExhausted(
                        f"live transcription fell {self.session.lag:.1f} s behind the audio (limit "
                        f"{self.abandon_lag:.0f} s): the service is overloaded; send fewer streams, "
                        "a smaller model, or retry on another instance"
                    )
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _drain(self) -> list[LiveEvent]:
        """Speech events from the reader and the results of a finished decode."""
        events, self._outbox = self._outbox, []
        future, job = self.in_flight, self._in_flight_job
        if future is not None and job is not None and future.done():
            self.in_flight, self._in_flight_job, self._in_flight_tag = None, None, None
            hypothesis = future.result()
            self.stats.decodes += 1
            self.stats.decode_seconds += hypothesis.compute_seconds
            events += self.session.apply(job, hypothesis)
            self.observer.decoded(hypothesis.compute_seconds, self.session.lag)
            self._log_lag_change()
        return self._track(events)

    def _log_lag_change(self) -> None:
        """A DEBUG record when the stream falls more than max_lag behind (it decodes less often,
        on larger chunks) and when it has caught up: at most one per crossing, never per decode."""
        behind = self.session.lag > self.session.settings.max_lag
        if behind != self._behind:
            self._behind = behind
            message = "live stream behind; decoding less often" if behind else "live stream caught up"
            logger.debug(message, extra={"lag_seconds": round(self.session.lag, 3)})

    def _drop_draft_for_final(self) -> None:
        """A final's decode is due while a draft decodes: drop the draft (its waiting model calls
        leave the scheduler, its result is never applied) so that the final does not wait for
        it; the session carries on as if that draft never ran."""
        job, future, tag = self._in_flight_job, self.in_flight, self._in_flight_tag
        if job is None or future is None or tag is None or job.urgent or future.done():
            return
        if not (self._ended or self.session.urgent_job_due()):
            return
        self.in_flight, self._in_flight_job, self._in_flight_tag = None, None, None
        if not future.cancel():  # not started yet: it never runs; else it ends soon, unapplied
            self._dropped = [*(f for f in self._dropped if not f.done()), future]
        if self.batch is not None:
            self.batch.scheduler.withdraw(tag)
        self.stats.drafts_dropped += 1
        self.observer.draft_dropped()

    def unfinished_decodes(self) -> list[Future[Hypothesis]]:
        """The decodes that may still use the model: the one in flight and dropped drafts not returned yet."""
        running = [future for future in self._dropped if not future.done()]
        return running if self.in_flight is None else [self.in_flight, *running]

    def _start_decode(self, loop: asyncio.AbstractEventLoop) -> bool:
        job = self.session.finish_job() if self._ended else self.session.next_job()
        if job is None:
            return False
        tag = CallTag(urgent=job.urgent)

        def decode() -> Hypothesis:
            with tagged_calls(tag):
                return self.decoder.decode(job.audio, job.prompt, final=job.final)

        future = self.worker.submit(decode, FINAL if job.urgent else DRAFT)
        self.in_flight, self._in_flight_job, self._in_flight_tag = future, job, tag
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._wake.set))
        return True

    async def _read(self, audio: AsyncIterator[bytes]) -> None:
        try:
            async for data in audio:
                self._push(self.pcm.decode(data))
            self._push(self.pcm.flush())
            self._ended = True
        finally:
            self._wake.set()

    def _push(self, samples: FloatArray) -> None:
        events = self.session.push(samples, self.detector.probabilities(samples))
        now = time.monotonic()
        self.clock.mark(self.session.received, now)
        for event in events:
            if isinstance(event, SpeechEvent) and event.kind == "SPEECH_STARTED" and self._speech_arrival is None:
                self._speech_arrival = self.clock.arrival(event.time)
        self._outbox += events
        self._wake.set()

    def _track(self, events: list[LiveEvent]) -> list[LiveEvent]:
        """Measure results as they go out: latencies, drafts rewritten."""
        now = time.monotonic()
        for event in events:
            if isinstance(event, SpeechEvent):  # the endpoint decisions: a few per utterance
                logger.debug(event.kind.lower().replace("_", " "), extra={"stream_seconds": round(event.time, 3)})
            if not isinstance(event, LiveResult):
                continue
            if self.stats.first_result_latency is None and self._speech_arrival is not None:
                self.stats.first_result_latency = now - self._speech_arrival
                self.observer.first_result(self.stats.first_result_latency)
            if event.is_final:
                self.stats.finals += 1
                arrived = self.clock.arrival(event.end)
                if arrived is not None:
                    self.observer.final_result(now - arrived)
                logger.debug(
                    "final result",
                    extra={
                        "result_id": event.result_id,
                        "start": round(event.start, 3),
                        "end": round(event.end, 3),
                        "latency_seconds": None if arrived is None else round(now - arrived, 3),
                    },
                )
                self._last_draft.pop(event.result_id, None)
            else:
                self.stats.drafts += 1
                before = self._last_draft.get(event.result_id)
                if before is not None and not event.text.startswith(before):
                    self.stats.rewrites += 1
                    self.observer.draft_rewritten()
                self._last_draft[event.result_id] = event.text
        return events
