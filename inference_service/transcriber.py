"""The transcription pipeline of one job: decode, (separate), (diarize), (VAD), transcribe, stream.

Runs in a job worker thread; every step reports progress on the job, segments are emitted
as faster-whisper produces them, and ``job.should_stop`` is polled so a cancel or a
passed deadline stops the work between segments.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from opentelemetry import trace

from inference_service.audio import WHISPER_SAMPLE_RATE, audio_duration, decode_audio
from inference_service.engines.batching import BatchedJob, Lane
from inference_service.engines.first_segment import decode_first_utterance
from inference_service.engines.speech_detector import SpeechDetector, VadSessions
from inference_service.engines.whisper import Segment, TranscribeOptions, TranscriptionInfo, WhisperEngine
from inference_service.errors import InvalidAudio, ModelLoadFailed
from inference_service.jobs import Job, Phase, Progress
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import LoadProgress, ModelCache, Reservation
from inference_service.payloads import Completed
from inference_service.speakers import (
    MAX_CLIP_SECONDS,
    MIN_CLIP_SECONDS,
    DiarizationRequest,
    SpeakerLabeller,
    speaker_labels,
)
from voxserve_common.client_strings import shown
from voxserve_common.errors import Cancelled, FailedPrecondition, NotFound, ResourceExhausted, Unavailable

WHISPER_WINDOW_SECONDS = 30.0
# How long file windows wait, after a batch served a request's latency-bound call, for the
# request's next call (its generate, or its first window after the first utterance). Live
# streams keep the scheduler's 20 ms: their jobs stay open between decodes, so every live batch
# holds file work that long. A request's step from its first utterance to its window took
# 23-28 ms on a slow hour of 2 CPU cores; past 20 ms a 5 min file's next call started first and
# the 11 s request waited for it (0.55-0.66 s) a second time (docs/performance.md, "Lane, rerun").
# The request's job closes when it ends, which ends the hold at once.
REQUEST_FOLLOW_UP_SECONDS = 0.05

logger = logging.getLogger(__name__)
# Spans of the stages, children of the RPC span: the job's thread runs in a copy of the
# submitting call's contextvars (JobManager.submit), so the current span is the RPC's.
tracer = trace.get_tracer("voxserve.inference")


SILENCE_PEAK = 1e-3  # -60 dBFS: below this everywhere, the audio holds no speech
# What a running job holds besides its models, per second of audio, for the cache's budget:
# faster-whisper computes the mel features of the whole file before its first window, and that
# is the peak: 0.93-0.96 MB per audio second (the STFT's complex frames), 0.10-0.17 MB after it
# (the samples, 64 kB/s, and the features, 32 kB/s with 80 mels). Measured on tiny.en int8 with
# the service's malloc thresholds, RSS sampled every 2 ms, 120 s and 600 s of audio. The peak is
# reserved for the whole job: jobs that start together must not find it promised twice.
JOB_BYTES_PER_AUDIO_SECOND = 1_000_000


def job_bytes(request_bytes: int, audio_seconds: float) -> int:
    """Upper bound of what one transcription holds: the request's bytes and its audio's peak."""
    return request_bytes + int(audio_seconds * JOB_BYTES_PER_AUDIO_SECOND)


def is_silent(audio: np.ndarray) -> bool:
    """True when no sample rises above -60 dBFS (digital or near-digital silence)."""
    return audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK


def _relay_to(job: Job) -> Callable[[LoadProgress], None]:
    """Turns a model's load progress into the job's PULLING_MODEL / LOADING_MODEL progress."""

    def relay(progress: LoadProgress) -> None:
        if progress.stage in ("pulling", "copying"):
            percent = 100.0 * progress.bytes_done / progress.bytes_total if progress.bytes_total else 0.0
            job.emit(
                Progress(
                    Phase.PULLING_MODEL,
                    percent,
                    progress.message or progress.stage,
                    progress.bytes_done,
                    progress.bytes_total,
                )
            )
        elif progress.stage == "loading":
            job.emit(Progress(Phase.LOADING_MODEL, 0.0, f"loading {progress.model_id}"))

    return relay


class Transcriber:
    """Runs jobs against models leased from the cache."""

    def __init__(
        self,
        cache: ModelCache,
        vad_model_id: str,
        metrics: InferenceMetrics | None = None,
        batch_size: int = 0,
        fast_first_segment: bool = False,
        diarization_model_id: str = "campplus-diarization",
    ) -> None:
        self.fast_first_segment = fast_first_segment
        self.diarization_model_id = diarization_model_id
        self._vad_sessions: VadSessions | None = None
        self.cache = cache
        self.batch_size = batch_size  # > 0: use faster-whisper's BatchedInferencePipeline
        self.vad_model_id = vad_model_id
        self.metrics = metrics

    def run(self, job: Job) -> None:
        request = job.request
        started = time.monotonic()
        job.emit(Progress(Phase.DECODING, 0.0, "decoding audio"))
        with tracer.start_as_current_span(
            "inference.audio_decode", attributes={"voxserve.audio.bytes": len(request.audio)}
        ) as span:
            audio = decode_audio(request.audio, WHISPER_SAMPLE_RATE)  # sets voxserve.audio.sample_rate
            duration = audio_duration(audio, WHISPER_SAMPLE_RATE)
            span.set_attribute("voxserve.audio.duration_seconds", duration)
        _phase_done("audio decoded", "decoding", started, audio_seconds=round(duration, 3))
        self._check_stop(job)
        relay = _relay_to(job)
        acquiring = time.monotonic()
        with (
            self.cache.acquire_as(request.model_id, WhisperEngine, on_progress=relay) as lease,
            self._held_by(job, duration),
            _cancels_decodes(job, lease.model),
        ):
            load_seconds = lease.load_seconds
            cache_hit = lease.cache_hit
            _phase_done("model acquired", "model_acquire", acquiring, cache_hit=cache_hit)
            self._check_stop(job)
            if request.separate_model_id:
                audio = self._separate(job, request.separate_model_id, relay)
            options = request.options
            if is_silent(audio):
                # Whisper invents words ("You") on pure silence; there is nothing to decode.
                job.emit(Progress(Phase.TRANSCRIBING, 100.0, "audio is silent"))
                self._complete(job, started, duration, load_seconds, cache_hit, [])
                return
            labeller: SpeakerLabeller | None = None
            if request.diarization is not None:
                labeller = self._diarize(job, audio, request.diarization, relay)
                options = replace(options, word_timestamps=True)  # a segment is split at the word
            if options.vad_filter:
                spans = self._speech_spans(job, audio, relay)
                if not spans:
                    self._complete(job, started, duration, load_seconds, cache_hit, [], labeller)
                    return
                flat = tuple(t for span in spans for t in span)
                options = replace(options, vad_filter=False, clip_timestamps=flat)
            attributes: dict[str, str | float | bool] = {
                "voxserve.model_id": request.model_id,
                "voxserve.audio.duration_seconds": duration,
                "voxserve.transcription.task": options.task,
            }
            if options.temperature is not None:
                attributes["voxserve.transcription.temperature"] = options.temperature
            with (
                tracer.start_as_current_span("inference.transcription", attributes=attributes) as span,
                self._decodes(job, lease.model) as batch,
            ):
                first = self._first_utterance(job, batch, audio, options, relay, labeller)
                if first is not None:
                    options = replace(options, clip_timestamps=(first.resume_at,))
                texts = self._transcribe(job, lease.model, batch, audio, options, first, duration, labeller)
                span.set_attribute("voxserve.transcription.segments", len(texts))
                span.set_attribute("voxserve.transcription.fast_first_segment", first is not None)
            self._complete(job, started, duration, load_seconds, cache_hit, texts, labeller)

    def _held_by(self, job: Job, duration: float) -> Reservation:
        """The job's own memory counted in the cache's budget while it runs (idle models make room).

        Raises:
            CacheFull: models in use or pinned and the other jobs and streams leave no room
                (RESOURCE_EXHAUSTED for the caller, with the figures).
        """
        nbytes = job_bytes(len(job.request.audio), duration)
        return self.cache.reserve(nbytes, f"transcription job {shown(job.job_id)} ({duration:.0f} s of audio)")

    def _decodes(self, job: Job, engine: WhisperEngine) -> contextlib.AbstractContextManager[BatchedJob | None]:
        """The job's one handle on the model's decode scheduler, for its first utterance and then
        its windows (one job: the scheduler's follow-up hold spans the step from one to the other);
        None for faster-whisper's batched pipeline, which decodes on its own."""
        if self.batch_size > 0:
            return contextlib.nullcontext()
        return _batch_job(job, engine, Lane.LATENCY)

    def _transcribe(
        self,
        job: Job,
        engine: WhisperEngine,
        batch: BatchedJob | None,
        audio: np.ndarray,
        options: TranscribeOptions,
        first: _FirstSent | None,
        duration: float,
        labeller: SpeakerLabeller | None = None,
    ) -> list[str]:
        """Decode and emit each segment as it comes (after the first utterance, if it was
        sent already); returns the texts of the segments sent."""
        job.emit(Progress(Phase.TRANSCRIBING, 0.0, "transcribing"))
        started = time.monotonic()
        if batch is None:
            info, segments = engine.transcribe_batched(
                audio,
                options,
                job.should_stop,
                batch_size=self.batch_size,
                without_timestamps=not options.word_timestamps,
            )
            texts = self._emit_segments(job, info, segments, first, duration, labeller)
        else:
            batch.move_to(file_lane(duration))
            info, segments = engine.transcribe(audio, options, job.should_stop, batch)
            texts = self._emit_segments(job, info, segments, first, duration, labeller)
        _phase_done("audio transcribed", "transcribing", started, segments=len(texts), language=info.language)
        return texts

    def _emit_segments(
        self,
        job: Job,
        info: TranscriptionInfo,
        segments: Iterator[Segment],
        first: _FirstSent | None,
        duration: float,
        labeller: SpeakerLabeller | None,
    ) -> list[str]:
        job.emit(info)
        span = trace.get_current_span()
        span.set_attribute("voxserve.transcription.language", info.language)
        texts: list[str] = [] if first is None else list(first.texts)
        if labeller is not None:
            segments = (part for segment in segments for part in labeller.split(segment))
        elif first is not None:
            segments = (replace(segment, index=segment.index + 1) for segment in segments)
        for segment in segments:
            if job.first_segment_at is None:
                job.first_segment_at = time.monotonic()
                if self.metrics is not None:
                    self.metrics.time_to_first_segment.labels(job.request.model_id).observe(
                        job.first_segment_at - job.created
                    )
            job.emit(segment)
            _segment_event(span, segment)
            texts.append(segment.text)
            percent = min(100.0, 100.0 * segment.end / duration) if duration else 100.0
            job.emit(Progress(Phase.TRANSCRIBING, percent))
        return texts

    def _first_utterance(
        self,
        job: Job,
        batch: BatchedJob | None,
        audio: np.ndarray,
        options: TranscribeOptions,
        relay: Callable[[LoadProgress], None],
        labeller: SpeakerLabeller | None = None,
    ) -> _FirstSent | None:
        """With fast_first_segment (the request's, else the service's): the first utterance
        decoded alone and sent now (None: the plain path)."""
        wanted = job.request.fast_first_segment
        if wanted is None:
            wanted = self.fast_first_segment
        if not wanted:
            return None
        if batch is None or options.clip_timestamps:
            if job.request.fast_first_segment:  # asked for by this request: say why it was not done
                reason = "the batched pipeline decodes VAD chunks" if self.batch_size > 0 else "vad_filter spans"
                logger.info("fast_first_segment not used", extra={"reason": reason})
            return None
        from inference_service.engines.vad import SileroVadEngine

        started = time.monotonic()
        try:
            vad_lease = self.cache.acquire_as(self.vad_model_id, SileroVadEngine, on_progress=relay)
        except (NotFound, Unavailable, FailedPrecondition, ResourceExhausted, ModelLoadFailed) as error:
            # An optimisation never fails a transcription: without its VAD model, the plain path.
            logger.warning(
                "fast_first_segment not used: the VAD model is not available",
                extra={"vad_model_id": self.vad_model_id, "reason": str(error)},
            )
            return None
        with vad_lease as vad, tracer.start_as_current_span("inference.first_utterance") as span:
            if self._vad_sessions is None:
                self._vad_sessions = VadSessions(self.cache.reserve)  # its memory counts in the budget
            detector = SpeechDetector(self._vad_sessions.session(vad.model.path))
            first = decode_first_utterance(batch.model, detector, audio, options)
            span.set_attribute("voxserve.first_utterance.found", first is not None)
            if first is not None:
                span.set_attribute("voxserve.first_utterance.resume_at", first.resume_at)
        _phase_done("first utterance searched", "first_utterance", started, found=first is not None)
        if first is not None:
            _segment_event(trace.get_current_span(), first.segment)
            logger.info(
                "first utterance decoded alone",
                extra={"segment_end": round(first.segment.end, 3), "resume_at": round(first.resume_at, 3)},
            )
            job.first_segment_at = time.monotonic()
            if self.metrics is not None:
                self.metrics.time_to_first_segment.labels(job.request.model_id).observe(
                    job.first_segment_at - job.created
                )
            parts = [first.segment] if labeller is None else list(labeller.split(first.segment))
            for part in parts:
                job.emit(part)
            return _FirstSent(first.resume_at, tuple(part.text for part in parts))
        return None

    def _complete(
        self,
        job: Job,
        started: float,
        duration: float,
        load_seconds: float,
        cache_hit: bool,
        texts: list[str],
        labeller: SpeakerLabeller | None = None,
    ) -> None:
        processing = time.monotonic() - started
        rtf = processing / duration if duration > 0 else 0.0
        speakers = labeller.speakers if labeller is not None else 0
        job.emit(Progress(Phase.DONE, 100.0))
        job.emit(
            Completed(
                duration,
                processing,
                rtf,
                load_seconds,
                cache_hit,
                len(texts),
                " ".join(t for t in texts if t),
                speakers,
            )
        )
        if self.metrics is not None:
            self.metrics.audio_seconds.labels(job.request.model_id).inc(duration)
            self.metrics.real_time_factor.labels(job.request.model_id).observe(rtf)
        logger.info(
            "transcription completed",
            extra={
                "audio_seconds": round(duration, 3),
                "processing_seconds": round(processing, 3),
                "rtf": round(rtf, 4),
                "segments": len(texts),
            },
        )

    def _diarize(
        self, job: Job, audio: np.ndarray, request: DiarizationRequest, relay: Callable[[LoadProgress], None]
    ) -> SpeakerLabeller:
        """Who spoke when in ``audio``, as the labeller of the job's segments.

        Raises:
            WrongModelKind: the diarization model is of another kind (INVALID_ARGUMENT).
            InvalidAudio: a known speaker's clip is not audio, or not 0.5-30 s long.
        """
        from inference_service.engines.diarization import VAD_THRESHOLD, SpeakerDiarizer
        from inference_service.engines.vad import SileroVadEngine

        model_id = request.model_id or self.diarization_model_id
        job.emit(Progress(Phase.DIARIZING, 0.0, f"finding speakers with {model_id}"))
        started = time.monotonic()
        clips = [_reference_clip(index, k.audio) for index, k in enumerate(request.known_speakers)]
        with (
            self.cache.acquire_as(model_id, SpeakerDiarizer, on_progress=relay) as lease,
            self.cache.acquire_as(self.vad_model_id, SileroVadEngine, on_progress=relay) as vad,
            tracer.start_as_current_span(
                "inference.diarization",
                attributes={
                    "voxserve.model_id": model_id,
                    "voxserve.diarization.min_speakers": request.bounds.min_speakers,
                    "voxserve.diarization.max_speakers": request.bounds.max_speakers,
                    "voxserve.diarization.known_speakers": len(clips),
                },
            ) as span,
        ):
            speech = vad.model.speech_timestamps(audio, threshold=VAD_THRESHOLD)
            result = lease.model.diarize(audio, speech, request.bounds, job.should_stop)
            voices = None
            if clips:
                voices = np.stack(
                    [
                        lease.model.embed_clip(clip, vad.model.speech_timestamps(clip, threshold=VAD_THRESHOLD))
                        for clip in clips
                    ]
                )
            labels = speaker_labels(result, [k.name for k in request.known_speakers], voices)
            span.set_attribute("voxserve.diarization.speakers", result.speakers)
            span.set_attribute("voxserve.diarization.turns", len(result.turns))
        seconds = time.monotonic() - started
        if self.metrics is not None:
            self.metrics.diarization_duration.labels(model_id).observe(seconds)
            self.metrics.diarization_speakers.labels(model_id).observe(result.speakers)
        job.emit(Progress(Phase.DIARIZING, 100.0, f"{result.speakers} speaker(s)"))
        _phase_done("speakers found", "diarization", started, speakers=result.speakers, turns=len(result.turns))
        self._check_stop(job)
        return SpeakerLabeller(result.turns, labels, job.request.options.word_timestamps)

    def _separate(self, job: Job, model_id: str, relay: Callable[[LoadProgress], None]) -> np.ndarray:
        job.emit(Progress(Phase.SEPARATING, 0.0, f"isolating vocals with {model_id}"))
        started = time.monotonic()
        from inference_service.engines.separation import DemucsSeparator

        with (
            self.cache.acquire_as(model_id, DemucsSeparator, on_progress=relay) as lease,
            tracer.start_as_current_span("inference.separation", attributes={"voxserve.model_id": model_id}) as span,
        ):
            separator = lease.model
            mixed = separator.decode_for_model(job.request.audio)
            vocals = separator.separate_vocals(mixed, job.should_stop)
            audio = separator.vocals_for_whisper(vocals)
            span.set_attribute("voxserve.audio.duration_seconds", audio_duration(audio, WHISPER_SAMPLE_RATE))
        job.emit(Progress(Phase.SEPARATING, 100.0, "vocals isolated"))
        _phase_done("vocals separated", "separation", started, separate_model_id=model_id)
        self._check_stop(job)
        return audio

    def _speech_spans(
        self, job: Job, audio: np.ndarray, relay: Callable[[LoadProgress], None]
    ) -> list[tuple[float, float]]:
        job.emit(Progress(Phase.VAD, 0.0, f"finding speech with {self.vad_model_id}"))
        started = time.monotonic()
        from inference_service.engines.vad import SileroVadEngine

        with (
            self.cache.acquire_as(self.vad_model_id, SileroVadEngine, on_progress=relay) as lease,
            tracer.start_as_current_span("inference.vad", attributes={"voxserve.model_id": self.vad_model_id}) as span,
        ):
            spans = lease.model.speech_timestamps(audio)
            span.set_attribute("voxserve.vad.chunks", len(spans))
            span.set_attribute("voxserve.vad.speech_seconds", float(sum(end - start for start, end in spans)))
        job.emit(Progress(Phase.VAD, 100.0, f"{len(spans)} speech span(s)"))
        _phase_done("speech found", "vad", started, speech_spans=len(spans))
        self._check_stop(job)
        return [(float(start), float(end)) for start, end in spans]

    @staticmethod
    def _check_stop(job: Job) -> None:
        if job.should_stop():
            raise Cancelled("job cancelled")


@dataclass(frozen=True)
class _FirstSent:
    """The first utterance as sent: where the plain path resumes, the texts of its segments."""

    resume_at: float
    texts: tuple[str, ...]


def _reference_clip(index: int, data: bytes) -> np.ndarray:
    """A known speaker's clip as 16 kHz samples.

    Raises:
        InvalidAudio: not audio, or shorter than MIN_CLIP_SECONDS or longer than MAX_CLIP_SECONDS.
    """
    try:
        clip = decode_audio(data, WHISPER_SAMPLE_RATE)
    except InvalidAudio as error:
        raise InvalidAudio(f"known_speakers[{index}].audio: {error}") from None
    seconds = audio_duration(clip, WHISPER_SAMPLE_RATE)
    if not MIN_CLIP_SECONDS <= seconds <= MAX_CLIP_SECONDS:
        raise InvalidAudio(
            f"known_speakers[{index}].audio is {seconds:.1f} s long; a reference clip must be "
            f"{MIN_CLIP_SECONDS:g}-{MAX_CLIP_SECONDS:g} s of that speaker alone"
        )
    return clip


def file_lane(duration: float) -> Lane:
    """A request that fits one Whisper window (30 s) is latency-bound, like a live decode: its
    calls go before the windows of longer files (one window each, so it cannot starve them)."""
    return Lane.LATENCY if duration <= WHISPER_WINDOW_SECONDS else Lane.FILE


def _batch_job(job: Job, engine: WhisperEngine, lane: Lane) -> BatchedJob:
    """The job's handle on the model's decode scheduler, linked to the current span (the
    transcription's), so each batch's span names the jobs it served."""
    options = job.request.options
    return engine.open_job(
        job.job_id,
        lane,
        trace.get_current_span().get_span_context(),
        follow_up_seconds=REQUEST_FOLLOW_UP_SECONDS,
        keep_prompt_text=bool(options.initial_prompt or options.hotwords),
    )


@contextlib.contextmanager
def _cancels_decodes(job: Job, engine: WhisperEngine) -> Iterator[None]:
    """While it lasts, cancelling the job, or its deadline passing, takes its decodes waiting for a
    batch off the queue at once (they fail with Cancelled; JobManager tells a deadline from a
    cancel) instead of at the next stop check between segments."""

    def cancel() -> None:
        engine.cancel(job.job_id)

    undo = job.on_cancel(cancel)
    deadline = job.request.deadline
    timer = None if deadline is None else threading.Timer(max(0.0, deadline - time.monotonic()), cancel)
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        undo()
        if timer is not None:
            timer.cancel()


def _phase_done(message: str, phase: str, started: float, **fields: object) -> None:
    """One DEBUG record per phase of a job, with its duration; job_id and model_id come from
    the job's log context (JobManager runs the job inside it)."""
    logger.debug(message, extra={"phase": phase, "seconds": round(time.monotonic() - started, 3), **fields})


def _segment_event(span: trace.Span, segment: Segment) -> None:
    span.add_event("segment", {"index": segment.index, "start": segment.start, "end": segment.end})
