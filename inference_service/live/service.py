"""Live transcription streams: admission, model leases shared across streams, metrics."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from typing_extensions import TypeVar

from inference_service.engines.batching import BatchedJob, Lane
from inference_service.engines.buffer_decoder import BufferDecoder, DecodeSettings
from inference_service.engines.speech_detector import SpeechDetector, VadSessions, VadThresholds
from inference_service.engines.whisper import TranscribeOptions, WhisperEngine
from inference_service.live.memory import stream_bytes
from inference_service.live.pcm import Encoding, PcmDecoder
from inference_service.live.session import SPEECH_PAD, LiveResult, LiveSession, LiveSettings
from inference_service.live.stream import LiveStream, StreamEvent
from inference_service.live.worker import DecodeWorker
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import Lease, ModelCache
from inference_service.payloads import Accepted, Completed
from voxserve_common.errors import Cancelled, InvalidArgument, ResourceExhausted
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("voxserve.inference")


@dataclass(frozen=True)
class LiveLimits:
    max_streams: int = 8
    endpoint_silence: float = 0.5
    max_lag: float = 3.0
    abandon_lag: float = 20.0
    decode_interval: float = 0.3
    beam_size: int = 1
    final_beam_size: int = 5
    window_bucket: float = 5.0


@dataclass(frozen=True)
class StreamRequest:
    """A StreamingConfig in domain terms; 0 for endpoint_silence / max_lag means the service default."""

    model_id: str
    options: TranscribeOptions
    encoding: Encoding
    sample_rate: int
    channels: int = 1
    interim_results: bool = True
    endpoint_silence: float = 0.0
    max_lag: float = 0.0
    job_id: str = ""
    beam_size_given: bool = False
    speech_threshold: float | None = None  # None: Silero's default (VadThresholds)
    speech_pad: float | None = None  # None: the session's default (SPEECH_PAD)


class _Observer:
    def __init__(self, metrics: InferenceMetrics | None, model_id: str, on_lag: Callable[[], None]) -> None:
        self.metrics = metrics
        self.model_id = model_id
        self.on_lag = on_lag
        self.lag = 0.0
        self.span: trace.Span = trace.INVALID_SPAN  # the stream's span, once it has one

    def first_result(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.live_time_to_first_result.labels(self.model_id).observe(seconds)

    def final_result(self, latency: float) -> None:
        if self.metrics is not None:
            self.metrics.live_final_latency.labels(self.model_id).observe(latency)

    def draft_rewritten(self) -> None:
        if self.metrics is not None:
            self.metrics.live_draft_rewrites.labels(self.model_id).inc()

    def draft_dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.live_drafts_dropped.labels(self.model_id).inc()

    def decoded(self, seconds: float, lag: float) -> None:
        self.lag = lag
        # The SDK keeps at most 128 events per span, so an hour-long stream stays bounded.
        self.span.add_event("decode", {"seconds": seconds, "lag_seconds": lag})
        if self.metrics is not None:
            self.metrics.live_decode_seconds.labels(self.model_id).observe(seconds)
            self.metrics.live_lag.labels(self.model_id).observe(lag)
            self.on_lag()


class LiveService:
    """Runs live streams: every stream of a model holds a lease on the one loaded copy, runs its
    decodes on the shared DecodeWorker (a thread per stream that may be open) and their model
    calls in the latency lane of the model's decode scheduler, batched with other streams'."""

    def __init__(
        self, cache: ModelCache, vad_model_id: str, limits: LiveLimits, metrics: InferenceMetrics | None = None
    ) -> None:
        self.cache = cache
        self.vad_model_id = vad_model_id
        self.limits = limits
        self.metrics = metrics
        self.worker = DecodeWorker(threads=limits.max_streams)
        self.vad_sessions = VadSessions(cache.reserve)
        self._lock = threading.Lock()
        self._active: dict[int, _Observer] = {}
        self._ids = 0

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        self.worker.close()
        self.vad_sessions.clear()

    def settings_for(self, request: StreamRequest) -> LiveSettings:
        """The stream's settings (InvalidArgument for a negative or absurd endpoint or lag)."""
        if not 0 <= request.endpoint_silence <= 10:
            raise InvalidArgument(
                f"endpoint_silence_seconds must be 0-10 (0 = default), got {request.endpoint_silence}"
            )
        if not 0 <= request.max_lag <= self.limits.abandon_lag:
            raise InvalidArgument(
                f"max_lag_seconds must be 0-{self.limits.abandon_lag:g} (0 = default), got {request.max_lag}"
            )
        threshold, pad = request.speech_threshold, request.speech_pad
        if threshold is not None and not 0.05 <= threshold <= 0.95:
            raise InvalidArgument(f"speech_threshold must be 0.05-0.95 (unset = 0.5), got {threshold:g}")
        if pad is not None and not 0 <= pad <= 2:
            raise InvalidArgument(f"speech_pad_seconds must be 0-2 (unset = {SPEECH_PAD:g}), got {pad:g}")
        return LiveSettings(
            interim_results=request.interim_results,
            speech_threshold=VadThresholds().speech if threshold is None else threshold,
            speech_pad=SPEECH_PAD if pad is None else pad,
            endpoint_silence=request.endpoint_silence or self.limits.endpoint_silence,
            max_lag=request.max_lag or self.limits.max_lag,
            decode_interval=self.limits.decode_interval,
            initial_prompt=request.options.initial_prompt or "",
            report_words=request.options.word_timestamps,
        )

    async def run(self, request: StreamRequest, audio: AsyncIterator[bytes]) -> AsyncGenerator[StreamEvent, None]:
        """Accepted, then the stream's events, then Completed once the client half-closed.

        Raises InvalidArgument (bad config or options, a bad message), ResourceExhausted
        (too many streams, the model cannot fit, processing too far behind), NotFound.
        """
        settings = self.settings_for(request)
        pcm = PcmDecoder(request.encoding, request.sample_rate, request.channels)
        key, observer = self._admit(request.model_id)
        job_id = request.job_id or uuid.uuid4().hex
        leases: list[_Held] = []  # model leases, the stream's memory reservation, its scheduler handle
        batch: BatchedJob | None = None
        stream: LiveStream | None = None
        outcome = "failed"
        started = time.monotonic()
        # Not made current: this generator yields to the servicer between events, and a
        # context attached here would leak into it. Its parent is the RPC span.
        span = observer.span = tracer.start_span(
            "inference.live_stream", attributes={"voxserve.model_id": request.model_id, "voxserve.job_id": job_id}
        )
        texts: list[str] = []
        try:
            with log_context(job_id=job_id, model_id=request.model_id):
                from inference_service.engines.vad import SileroVadEngine

                whisper = await _off_loop(lambda: self.cache.acquire_as(request.model_id, WhisperEngine))
                leases.append(whisper)
                vad = await _off_loop(lambda: self.cache.acquire_as(self.vad_model_id, SileroVadEngine))
                leases.append(vad)
                await asyncio.to_thread(self.vad_sessions.session, vad.model.path)  # made (and reserved) once
                # The stream's own memory counts in the cache's budget (idle models make room).
                nbytes = stream_bytes(settings, self.limits.abandon_lag)
                leases.append(await _off_loop(lambda: self.cache.reserve(nbytes, f"live stream {job_id}")))
                span.set_attribute("voxserve.live.reserved_bytes", nbytes)
                own_prompt = bool(request.options.initial_prompt or request.options.hotwords)
                batch = whisper.model.open_job(
                    job_id, Lane.LATENCY, span.get_span_context(), keep_prompt_text=own_prompt
                )
                leases.insert(0, _Closing(batch))  # closed first: before the model may be evicted
                stream = self._stream(request, settings, pcm, batch, whisper.model, vad.model.path, observer)
                logger.info("live stream started", extra={"rate": request.sample_rate, "encoding": request.encoding})
                yield stream.event(Accepted(0, request.model_id))
                async for event in stream.run(audio):
                    if isinstance(event.payload, LiveResult) and event.payload.is_final:
                        texts.append(event.payload.text)
                    yield event
                yield stream.event(self._completed(stream, whisper, started, texts))
                outcome = "completed"
        except ResourceExhausted as exc:
            outcome = "overloaded"
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            raise
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            outcome = "cancelled"
            raise
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            span.set_attribute("voxserve.live.outcome", outcome)
            span.set_attribute("voxserve.live.final_results", len(texts))
            if stream is not None:
                span.set_attribute("voxserve.audio.duration_seconds", stream.session.received)
                span.set_attribute("voxserve.live.decodes", stream.stats.decodes)
                _log_stats(stream, job_id, request.model_id)
            span.end()
            self._release(stream, leases, batch)
            self._leave(key, outcome)
            logger.info("live stream ended", extra={"outcome": outcome, "job_id": job_id})

    def _stream(
        self,
        request: StreamRequest,
        settings: LiveSettings,
        pcm: PcmDecoder,
        batch: BatchedJob,
        engine: WhisperEngine,
        vad_path: Path,
        observer: _Observer,
    ) -> LiveStream:
        options = engine.validate(request.options)
        beam = options.beam_size if request.beam_size_given else self.limits.beam_size
        final_beam = options.beam_size if request.beam_size_given else self.limits.final_beam_size
        decoder = BufferDecoder(
            batch.model,
            DecodeSettings(
                options.language,
                options.task,
                beam,
                True,  # aligned words for the session's checks; results carry them if asked for
                options.hotwords,
                options.temperature,
                final_beam_size=final_beam,
                window_bucket=self.limits.window_bucket,
            ),
        )
        logger.debug(
            "live stream settings",
            extra={
                "endpoint_silence": settings.endpoint_silence,
                "max_lag": settings.max_lag,
                "interim_results": settings.interim_results,
                "beam_size": beam,
                "final_beam_size": final_beam,
            },
        )
        detector = SpeechDetector(self.vad_sessions.session(vad_path))
        return LiveStream(
            LiveSession(settings), pcm, detector, decoder, self.worker, self.limits.abandon_lag, observer, batch
        )

    @staticmethod
    def _completed(stream: LiveStream, lease: Lease[WhisperEngine], started: float, texts: list[str]) -> Completed:
        audio = stream.session.received
        compute = stream.stats.decode_seconds
        return Completed(
            audio_seconds=audio,
            processing_seconds=time.monotonic() - started,
            real_time_factor=compute / audio if audio > 0 else 0.0,
            model_load_seconds=lease.load_seconds,
            cache_hit=lease.cache_hit,
            segments=len(texts),
            text=" ".join(texts),
        )

    def _admit(self, model_id: str) -> tuple[int, _Observer]:
        with self._lock:
            if len(self._active) >= self.limits.max_streams:
                raise ResourceExhausted(
                    f"too many live streams: {len(self._active)} open (limit {self.limits.max_streams}); "
                    "retry later or on another instance"
                )
            self._ids += 1
            observer = _Observer(self.metrics, model_id, self._update_gauges)
            self._active[self._ids] = observer
            key = self._ids
        self._update_gauges()
        return key, observer

    def _leave(self, key: int, outcome: str) -> None:
        with self._lock:
            self._active.pop(key, None)
        if self.metrics is not None:
            self.metrics.live_streams_finished.labels(outcome).inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            count = len(self._active)
            lag = max((o.lag for o in self._active.values()), default=0.0)
        self.metrics.live_streams_active.set(count)
        self.metrics.live_max_lag.set(lag)

    @staticmethod
    def _release(stream: LiveStream | None, leases: list[_Held], batch: BatchedJob | None) -> None:
        """Give the models back, after the decodes still running on them if there are any (the
        one in flight, drafts dropped for a final that have not returned yet; their calls
        waiting for a batch leave the queue at once)."""
        futures = stream.unfinished_decodes() if stream is not None else []
        running = [future for future in futures if not future.cancel() and not future.done()]
        if not running:
            _release_all(leases)
            return
        if batch is not None:
            batch.cancel()
        left = [len(running)]
        lock = threading.Lock()

        def one_done(_: object) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                _release_all(leases)

        for future in running:
            future.add_done_callback(one_done)


def _log_stats(stream: LiveStream, job_id: str, model_id: str) -> None:
    """The counts of a stream that ended, at DEBUG (its log context is closed by then)."""
    stats = stream.stats
    logger.debug(
        "live stream stats",
        extra={
            "job_id": job_id,
            "model_id": model_id,
            "audio_seconds": round(stream.session.received, 3),
            "decodes": stats.decodes,
            "decode_seconds": round(stats.decode_seconds, 3),
            "finals": stats.finals,
            "drafts": stats.drafts,
            "drafts_dropped": stats.drafts_dropped,
            "rewrites": stats.rewrites,
        },
    )


class _Closing:
    """A scheduler handle held like a lease: closed when the stream lets its models go."""

    def __init__(self, batch: BatchedJob) -> None:
        self.batch = batch

    def release(self) -> None:
        self.batch.close()


class _Held(Protocol):
    """A lease or a memory reservation: given back once the stream is done with it."""

    def release(self) -> None: ...


H = TypeVar("H", bound=_Held)


async def _off_loop(call: Callable[[], H]) -> H:
    """``call()`` in a thread (it may load or evict models); if the caller is cancelled
    meanwhile, what it returns is released as soon as it returns."""
    loop = asyncio.get_running_loop()
    future: Future[H] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting stream
            future.set_exception(exc)

    loop.run_in_executor(None, run)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(_release_when_done)
        raise


def _release_when_done(future: Future[H]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


def _release_all(leases: list[_Held]) -> None:
    for lease in leases:
        lease.release()
