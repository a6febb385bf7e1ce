"""A fast first segment for files: decode the first utterance the VAD finds on its own, then go on.

The plain path sends its first segment once the first 30 s window is decoded: 1.7-2.0 s
for 67 s of speech with tiny.en on 2 cores. The first utterance (speech up to its first
pause of 0.3 s, within the first 15 s) decoded with the buffer decoder (encoder cut to its
length) comes out in a fraction of that; the plain path then starts where it ended.
"""

from __future__ import annotations

from dataclasses import dataclass

from faster_whisper import WhisperModel

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray
from inference_service.engines.buffer_decoder import BufferDecoder, DecodeSettings
from inference_service.engines.speech_detector import CHUNK_SECONDS, SpeechDetector, VadThresholds
from inference_service.engines.whisper import Segment, TranscribeOptions

SEARCH_SECONDS = 15.0  # look for the first pause within this much audio
PAUSE_SECONDS = 0.3
PAD_BEFORE = 0.2
PAD_AFTER = 0.1
BLOCK_SECONDS = 1.0


@dataclass(frozen=True)
class FirstUtterance:
    segment: Segment
    resume_at: float  # where the plain path continues


def first_speech_span(detector: SpeechDetector, audio: FloatArray) -> tuple[float, float] | None:
    """(start, end) of the first speech followed by a pause, or None if there is none early on."""
    thresholds = VadThresholds()
    block = int(BLOCK_SECONDS * WHISPER_SAMPLE_RATE)
    limit = min(audio.shape[0], int(SEARCH_SECONDS * WHISPER_SAMPLE_RATE))
    time, start, silence = 0.0, None, None
    for offset in range(0, limit, block):
        for probability in detector.probabilities(audio[offset : min(limit, offset + block)]):
            if probability >= thresholds.speech:
                start = time if start is None else start
                silence = None
            elif probability < thresholds.silence and start is not None:
                silence = time if silence is None else silence
                if time + CHUNK_SECONDS - silence >= PAUSE_SECONDS:
                    return max(0.0, start - PAD_BEFORE), silence + PAD_AFTER
            time += CHUNK_SECONDS
    return None


def decode_first_utterance(
    model: WhisperModel, detector: SpeechDetector, audio: FloatArray, options: TranscribeOptions
) -> FirstUtterance | None:
    """The first utterance as segment 0, or None (no early pause, or nothing said in it).
    ``model``: the model of a latency-lane job (``WhisperEngine.open_job``), so that the decode
    goes before the file windows waiting for a batch."""
    span = first_speech_span(detector, audio)
    if span is None:
        return None
    start, end = span
    settings = DecodeSettings(
        options.language,
        options.task,
        options.beam_size,
        options.word_timestamps,
        options.hotwords,
        options.temperature,
    )
    decoder = BufferDecoder(model, settings)
    samples = audio[int(start * WHISPER_SAMPLE_RATE) : int(end * WHISPER_SAMPLE_RATE)]
    hypothesis = decoder.decode(samples, options.initial_prompt or "")
    texts = [s.text for s in hypothesis.segments]
    if not texts:
        return None
    words = tuple(
        type(w)(start + w.start, start + w.end, w.word, w.probability) for s in hypothesis.segments for w in s.words
    )
    first, last = hypothesis.segments[0], hypothesis.segments[-1]
    segment = Segment(0, start + first.start, min(end, start + last.end), " ".join(texts), words, 0.0, 0.0)
    return FirstUtterance(segment, end)
