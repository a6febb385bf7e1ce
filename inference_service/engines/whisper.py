"""Whisper speech-to-text through faster-whisper (CTranslate2), streaming segments lazily."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES

from inference_service.engines.batching import BatchedJob, DecodeScheduler, Lane
from inference_service.engines.device import DeviceChoice, on_passing_thread
from inference_service.engines.schedulers import UNBATCHED, DecodeSchedulers
from inference_service.errors import InvalidAudio, InvalidOptions, ModelFilesMissing, ModelLoadFailed
from voxserve_common.client_strings import shown
from voxserve_common.errors import Cancelled, FailedPrecondition
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)

TASKS = ("transcribe", "translate")
MAX_BEAM_SIZE = 20
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
SAMPLE_RATE = 16000
# CTranslate2 replicas of a loaded model (they share its weights); with two, one runs a file
# window while the other serves latency-bound calls at once (batching.py; the setting
# decode_replicas says why one is the default).
DECODE_REPLICAS = 1
LANGUAGE_CODES: frozenset[str] = frozenset(_LANGUAGE_CODES)
# faster-whisper's default: greedy/beam at 0, retried hotter when a decode fails its checks.
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
MAX_TEMPERATURE = 1.0


def _never() -> bool:
    return False


def checked_temperature(value: float | None) -> float | None:
    """A requested temperature, rounded to 6 digits (the proto's float32 makes 0.2 into
    0.20000000298...); None stays None.

    Raises:
        InvalidOptions: outside 0..1, or not a number.
    """
    if value is None:
        return None
    if not 0.0 <= value <= MAX_TEMPERATURE:  # NaN fails this too
        raise InvalidOptions(
            f"temperature must be between 0 and {MAX_TEMPERATURE:g} (0 = greedy/beam search, "
            f"higher = more random sampling), got {value:g}; leave it unset for the default schedule"
        )
    return round(float(value), 6)


@dataclass(frozen=True)
class TranscribeOptions:
    """What a client may choose per request; empty strings count as "not set" (proto3 defaults)."""

    language: str | None = None
    task: str = "transcribe"
    beam_size: int = 5
    vad_filter: bool = False
    word_timestamps: bool = False
    initial_prompt: str | None = None
    hotwords: str | None = None
    # Speech spans (start, end, start, end, ... in seconds) to decode; empty = all audio.
    clip_timestamps: tuple[float, ...] = ()
    # None: faster-whisper's schedule (DEFAULT_TEMPERATURES); a value: only that temperature
    # (0 = greedy/beam search, above 0 = sampling), no fallback.
    temperature: float | None = None

    @property
    def temperatures(self) -> tuple[float, ...]:
        """What faster-whisper is asked to use, in order."""
        return DEFAULT_TEMPERATURES if self.temperature is None else (self.temperature,)


@dataclass(frozen=True)
class Word:
    """One word with its time span in seconds; ``word`` keeps its leading space so words join back."""

    start: float
    end: float
    word: str
    probability: float
    speaker: str = ""  # with diarization: the label of who said it


@dataclass(frozen=True)
class Segment:
    """One decoded span of speech; ``index`` counts from 0 within a transcription."""

    index: int
    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    avg_logprob: float
    no_speech_prob: float
    temperature: float | None = None  # the temperature of the decode that produced it, when known
    speaker: str = ""  # with diarization: the label of who said it


@dataclass(frozen=True)
class TranscriptionInfo:
    """Known before the first segment: the language used and the input duration in seconds."""

    language: str
    language_probability: float
    duration: float


class WhisperEngine:
    """A loaded faster-whisper model; one instance serves many requests at once: the encoder and
    decoder calls of every job opened on it (``open_job``) run in shared batches on its
    ``DecodeScheduler`` (engines/batching.py)."""

    kind: ClassVar[ModelKind] = ModelKind.WHISPER

    def __init__(
        self, model_id: str, model: WhisperModel, device: DeviceChoice, scheduler: DecodeScheduler | None = None
    ) -> None:
        self.model_id = model_id
        self.choice = device
        self._model: WhisperModel | None = model
        self._batched: BatchedInferencePipeline | None = None
        self.scheduler = scheduler or DecodeScheduler(model_id, model, UNBATCHED)

    @classmethod
    def load(
        cls,
        model_id: str,
        model_dir: Path,
        device: DeviceChoice,
        cpu_threads: int = 0,
        schedulers: DecodeSchedulers | None = None,
        replicas: int = DECODE_REPLICAS,
    ) -> WhisperEngine:
        """Load a CTranslate2 Whisper model from a local directory (never from the network), with
        its scheduler from ``schedulers`` (the service's batch settings; none: every call alone).

        ``cpu_threads=0`` lets CTranslate2 pick (OMP_NUM_THREADS or 4), per replica; ``replicas``
        CTranslate2 replicas share the weights (two let the scheduler run latency calls beside a
        file window).

        Raises:
            ModelFilesMissing: the directory lacks model.bin, config.json or tokenizer.json
                (without tokenizer.json faster-whisper would try to download one).
            ModelLoadFailed: CTranslate2 could not read the files.
        """
        missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
        if missing:
            raise ModelFilesMissing(
                f"model {model_id!r} is not a CTranslate2 Whisper model: {', '.join(missing)} missing "
                f"in {model_dir}; pull a faster-whisper conversion (e.g. Systran/faster-whisper-tiny.en)"
            )
        try:
            model = on_passing_thread(
                lambda: WhisperModel(
                    str(model_dir),
                    device=device.device,
                    compute_type=device.compute_type,
                    cpu_threads=cpu_threads,
                    num_workers=replicas,
                    local_files_only=True,
                ),
                name="whisper-load",
            )
        except Exception as exc:
            raise ModelLoadFailed(f"loading whisper model {model_id!r} from {model_dir} failed: {exc}") from exc
        logger.info("whisper model loaded", extra={"model_id": model_id, "device": device.device})
        return cls(model_id, model, device, schedulers.make(model_id, model) if schedulers is not None else None)

    def open_job(
        self,
        key: str,
        lane: Lane,
        link: object | None = None,
        follow_up_seconds: float | None = None,
        keep_prompt_text: bool = False,
    ) -> BatchedJob:
        """A job's handle on this model's scheduler (a context manager): drive ``handle.model`` as a
        faster-whisper model, or pass the handle to ``transcribe``. ``key`` is what ``cancel`` names
        (the job id); ``link`` the job's span context, linked from the span of each batch serving it;
        ``follow_up_seconds`` how long file work waits for its next call, ``keep_prompt_text`` that
        its prompts hold the caller's own text, never cut to a bucket (``DecodeScheduler.open_job``).

        Raises:
            FailedPrecondition: the engine was closed (evicted or unloaded).
        """
        self._loaded()
        return self.scheduler.open_job(key, lane, link, follow_up_seconds, keep_prompt_text)

    def cancel(self, key: str) -> int:
        """The waiting encoder/decoder calls of the jobs opened with ``key`` fail with Cancelled at
        once, and so do their later calls; returns how many calls left the queue."""
        return self.scheduler.cancel(key)

    @property
    def is_multilingual(self) -> bool:
        """False for English-only checkpoints such as tiny.en, which cannot translate."""
        return bool(self._loaded().model.is_multilingual)

    @property
    def whisper_model(self) -> WhisperModel:
        """The faster-whisper model itself, for callers that drive it directly (live decoding, warm-up).

        Raises:
            FailedPrecondition: the engine was closed (evicted or unloaded).
        """
        return self._loaded()

    def _loaded(self) -> WhisperModel:
        if self._model is None:
            raise FailedPrecondition(f"whisper model {self.model_id!r} was closed; load it again")
        return self._model

    def validate(self, options: TranscribeOptions) -> TranscribeOptions:
        """Check options against this model and normalise them (``""`` -> ``None``, lower-case language).

        Raises:
            InvalidOptions: unknown task, beam size outside 1..20, temperature outside 0..1,
                unknown language code, or a translation/non-English language asked of an
                English-only model.
        """
        if options.task not in TASKS:
            raise InvalidOptions(f"unknown task {options.task!r}; use one of {', '.join(TASKS)}")
        if not 1 <= options.beam_size <= MAX_BEAM_SIZE:
            raise InvalidOptions(f"beam_size must be between 1 and {MAX_BEAM_SIZE}, got {options.beam_size}")
        temperature = checked_temperature(options.temperature)
        language = (options.language or "").strip().lower() or None
        if language is not None and language not in LANGUAGE_CODES:
            raise InvalidOptions(
                f"unknown language code {shown(options.language or '')}; use an ISO 639-1 code such as 'en', 'de' "
                "or 'fr', or leave it empty to detect the language"
            )
        if not self.is_multilingual:
            if options.task == "translate":
                raise InvalidOptions(
                    f"model {self.model_id!r} is English-only and cannot translate; "
                    "use task 'transcribe' or a multilingual model (e.g. tiny instead of tiny.en)"
                )
            if language not in (None, "en"):
                raise InvalidOptions(
                    f"model {self.model_id!r} is English-only and cannot transcribe language {language!r}; "
                    "use language 'en' (or leave it empty) or a multilingual model"
                )
        return TranscribeOptions(
            language=language,
            task=options.task,
            beam_size=options.beam_size,
            vad_filter=options.vad_filter,
            word_timestamps=options.word_timestamps,
            initial_prompt=options.initial_prompt or None,
            hotwords=options.hotwords or None,
            clip_timestamps=tuple(options.clip_timestamps),
            temperature=temperature,
        )

    @staticmethod
    def _check_audio(audio: np.ndarray) -> np.ndarray:
        if audio.ndim != 1:
            raise InvalidAudio(f"whisper needs 16 kHz mono audio of shape (samples,), got shape {audio.shape}")
        if audio.size == 0:
            raise InvalidAudio("the audio contains no samples; send at least a fraction of a second")
        return audio.astype(np.float32, copy=False)

    def transcribe(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        should_stop: Callable[[], bool] = _never,
        batch: BatchedJob | None = None,
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        """Start a transcription of 16 kHz mono float32 audio.

        Options are validated, the VAD filter and language detection run now; the returned
        generator decodes one segment per ``next()``, so the caller can stream results and a
        cancelled client stops the work: ``should_stop`` is polled before each segment. With
        ``batch`` (a handle from ``open_job``) its windows are decoded in batches shared with the
        other jobs, with the same results as alone; the caller closes the handle.

        Raises:
            InvalidOptions, InvalidAudio: at call time.
            Cancelled: from the generator, once ``should_stop()`` returns True.
        """
        opts = self.validate(options)
        samples = self._check_audio(audio)
        model = self._loaded() if batch is None else batch.model
        segments, info = model.transcribe(
            samples,
            language=opts.language,
            task=opts.task,
            beam_size=opts.beam_size,
            vad_filter=opts.vad_filter,
            word_timestamps=opts.word_timestamps,
            initial_prompt=opts.initial_prompt,
            hotwords=opts.hotwords,
            clip_timestamps=list(opts.clip_timestamps) if opts.clip_timestamps else "0",
            temperature=list(opts.temperatures),
        )
        return self._info(info), self._stream(segments, should_stop)

    def transcribe_batched(
        self,
        audio: np.ndarray,
        options: TranscribeOptions,
        should_stop: Callable[[], bool] = _never,
        batch_size: int = 8,
        without_timestamps: bool = True,
    ) -> tuple[TranscriptionInfo, Iterator[Segment]]:
        """Like ``transcribe`` but decodes ``batch_size`` VAD chunks of one file at once, with
        faster-whisper's BatchedInferencePipeline: an opt-in (``batched``) for one very long file,
        which gives up the previous text as prompt and the temperature fallback. Its calls are
        batches already and go to the model directly, beside the scheduler's.

        The pipeline needs chunk boundaries, so audio of 30 s or more always goes through
        the VAD. With ``without_timestamps`` (faster-whisper's default) each segment is a
        whole VAD chunk of up to 30 s. Raises as ``transcribe``.
        """
        if batch_size < 1:
            raise InvalidOptions(f"batch_size must be at least 1, got {batch_size}")
        opts = self.validate(options)
        samples = self._check_audio(audio)
        if self._batched is None:
            self._batched = BatchedInferencePipeline(self._loaded())
        long_audio = samples.shape[0] >= 30 * SAMPLE_RATE
        segments, info = self._batched.transcribe(
            samples,
            language=opts.language,
            task=opts.task,
            beam_size=opts.beam_size,
            vad_filter=opts.vad_filter or long_audio,
            word_timestamps=opts.word_timestamps,
            initial_prompt=opts.initial_prompt,
            hotwords=opts.hotwords,
            batch_size=batch_size,
            without_timestamps=without_timestamps,
            temperature=list(opts.temperatures),
        )
        return self._info(info), self._stream(segments, should_stop)

    @staticmethod
    def _info(info: Any) -> TranscriptionInfo:
        return TranscriptionInfo(
            language=str(info.language),
            language_probability=float(info.language_probability),
            duration=float(info.duration),
        )

    def _stream(self, segments: Iterable[Any], should_stop: Callable[[], bool]) -> Iterator[Segment]:
        source = iter(segments)
        index = 0
        try:
            while True:
                if should_stop():
                    logger.info("transcription cancelled", extra={"model_id": self.model_id, "segments": index})
                    raise Cancelled(f"transcription was cancelled after {index} segment(s)")
                try:
                    seg = next(source)
                except StopIteration:
                    return
                yield Segment(
                    index=index,
                    start=float(seg.start),
                    end=float(seg.end),
                    text=seg.text.strip(),
                    words=tuple(
                        Word(float(w.start), float(w.end), w.word, float(w.probability)) for w in seg.words or ()
                    ),
                    avg_logprob=float(seg.avg_logprob),
                    no_speech_prob=float(seg.no_speech_prob),
                    temperature=None if seg.temperature is None else float(seg.temperature),
                )
                index += 1
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    @property
    def device(self) -> str:
        """Where the model runs ("cpu" or "cuda"), for the cache's listing."""
        return self.choice.device

    @property
    def compute_type(self) -> str:
        return self.choice.compute_type

    def close(self) -> None:
        """Free the model's memory now rather than whenever the garbage collector runs."""
        if self._model is None:
            return
        self.scheduler.close()
        self._batched = None
        model, self._model = self._model, None
        if self.choice.device == "cuda":
            # CTranslate2 keeps freed device blocks in a caching allocator per thread (up to
            # 200 MB each by default): unload_model() frees the weights and clears its workers'
            # caches, so the memory goes back to the driver, not only out of torch's cache.
            # (Not run on a GPU here: see docs/architecture.md, "Idle unload".)
            unload = getattr(getattr(model, "model", None), "unload_model", None)
            if unload is not None:
                unload()
        del model
        gc.collect()
        if self.choice.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        logger.info("whisper model closed", extra={"model_id": self.model_id})
