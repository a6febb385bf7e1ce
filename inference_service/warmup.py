"""Model warm-up: one short decode of silence right after a Whisper model loads, inside the load.

A freshly loaded CTranslate2 model pays one-off costs on its first decode (allocating the
encoder's and decoder's work buffers, the first run of the compute kernels, the tokenizer
and feature extractor warming up). Paying them inside the load means the first request
after a cold load runs as fast as the second; bench/bench_warmup.py measures the figure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from inference_service.engines.whisper import WhisperEngine
from inference_service.errors import ModelLoadFailed

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WARMUP_AUDIO_SECONDS = 1.0  # faster-whisper pads to a 30 s window anyway: 1 s runs the whole encoder
WARMUP_BEAM_SIZE = 5  # the default of a request, so the decoder's beam buffers are the ones requests use


@dataclass(frozen=True)
class Warmup:
    """What one warm-up did: its wall time, the audio it decoded and the segments it produced."""

    seconds: float
    audio_seconds: float
    segments: int


def warm_up(model: object) -> Warmup | None:
    """Decode WARMUP_AUDIO_SECONDS of silence through a Whisper engine; None for other models
    (VAD, Demucs: their first call is cheap enough).

    Raises ModelLoadFailed when the decode fails: a model that cannot decode silence would
    fail its first request, better to fail the load (which is not cached, so retried).
    """
    if not isinstance(model, WhisperEngine):
        return None
    audio = np.zeros(int(SAMPLE_RATE * WARMUP_AUDIO_SECONDS), dtype=np.float32)
    started = time.perf_counter()
    try:
        segments, _ = model.whisper_model.transcribe(audio, beam_size=WARMUP_BEAM_SIZE, vad_filter=False)
        count = sum(1 for _ in segments)  # the generator decodes lazily: run it to the end
    except Exception as exc:
        raise ModelLoadFailed(
            f"warm-up decode of model {model.model_id!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    done = Warmup(time.perf_counter() - started, WARMUP_AUDIO_SECONDS, count)
    logger.info(
        "model warmed up",
        extra={
            "model_id": model.model_id,
            "warmup_seconds": round(done.seconds, 3),
            "audio_seconds": done.audio_seconds,
        },
    )
    return done
