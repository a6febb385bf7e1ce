"""Transcribe with fast_first_segment: the first utterance is decoded on its own and sent first."""

from __future__ import annotations

from typing import Any

from tests.support import DATA_DIR, TRANSCRIPTS, transcribe, word_error_rate

MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()


def segments(events: list[Any]) -> list[Any]:
    return [e.segment for e in events if e.WhichOneof("event") == "segment"]


def test_first_utterance_comes_first_and_the_rest_follows_without_repeating_it(start_inference: Any) -> None:
    plain_handle = start_inference(fast_first_segment=False)
    plain = segments(transcribe(plain_handle, MULTI))
    plain_handle.stop()
    fast_handle = start_inference(store=plain_handle.store)  # on by default
    events = transcribe(fast_handle, MULTI)
    fast = segments(events)
    assert [s.index for s in fast] == list(range(len(fast)))
    assert fast[0].text.lower().startswith("good morning") and fast[0].end <= 3.6
    assert all(later.start >= fast[0].end - 0.05 for later in fast[1:])  # the plain path resumed after it
    assert not any("good morning" in s.text.lower() for s in fast[1:])
    reference = TRANSCRIPTS["speech_multi.wav"]
    fast_wer = word_error_rate(reference, " ".join(s.text for s in fast))
    assert fast_wer <= word_error_rate(reference, " ".join(s.text for s in plain)) + 0.03
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.index("segment") < kinds.index("info")  # sent before the plain path even started
    assert events[-1].completed.segments == len(fast)
