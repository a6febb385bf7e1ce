"""A live decode that loops into its padding is never sent as words twice (issue 10), on real speech.

tiny.en on 3.6 s of tests/data/speech_multi.wav cut right after "... the design team."
(11.5-15.1 s) runs on into the padding and says the sentence again, every word of the
repeat aligned to the last instant of the audio: the same failure as JFK's "And so my fellow
Americans. And so my fellow" in the bench (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from faster_whisper import WhisperModel

from inference_service.audio import WHISPER_SAMPLE_RATE, decode_audio
from inference_service.engines.buffer_decoder import BufferDecoder, DecodeSettings, Hypothesis, normalise
from inference_service.engines.speech_detector import CHUNK
from inference_service.live.session import LiveResult, LiveSession, LiveSettings
from tests.support import DATA_DIR, TINY_EN_DIR

CUT = (11.5, 15.1)  # "Friday. Third, the design team." of speech_multi.wav


@pytest.fixture(scope="module")
def decoder() -> Iterator[BufferDecoder]:
    model = WhisperModel(str(TINY_EN_DIR), device="cpu", compute_type="int8", cpu_threads=1)
    # Unpadded windows (live_window_bucket_seconds 0): padded to a 5 s bucket, this cut does not
    # loop, and dropping a loop needs one to be tested.
    yield BufferDecoder(model, DecodeSettings("en", "transcribe", 1, True, None, window_bucket=0))


def words_of(hypothesis: Hypothesis) -> list[str]:
    return [normalise(w.word) for s in hypothesis.segments for w in s.words]


def repeats_its_tail(words: list[str]) -> bool:
    """Ends with a run of 2+ words said just before it ("a b c a b c")."""
    return any(words[-size:] == words[-2 * size : -size] for size in range(2, len(words) // 2 + 1))


def test_a_draft_that_loops_into_the_padding_says_its_words_once(decoder: BufferDecoder) -> None:
    audio = decode_audio((DATA_DIR / "speech_multi.wav").read_bytes())
    cut = audio[round(CUT[0] * WHISPER_SAMPLE_RATE) : round(CUT[1] * WHISPER_SAMPLE_RATE)]
    cut = cut[: cut.shape[0] // CHUNK * CHUNK]
    session = LiveSession(LiveSettings(min_cut_buffer=100))
    session.push(cut, [0.9] * (cut.shape[0] // CHUNK))  # all of it speech: one open utterance
    job = session.next_job()
    assert job is not None and not job.final and job.audio.shape == cut.shape
    hypothesis = decoder.decode(job.audio, job.prompt)
    raw = words_of(hypothesis)
    # The model's own output loops on this cut (if tiny.en ever stops doing so, pick another cut).
    assert repeats_its_tail(raw), raw
    results = [e for e in session.apply(job, hypothesis) if isinstance(e, LiveResult)]
    assert results, raw
    sent = [normalise(w) for w in results[-1].text.split()]
    assert not repeats_its_tail(sent) and sent == raw[: len(sent)], (raw, results[-1].text)
    assert sent[-3:] == ["the", "design", "team"], results[-1].text
