"""LiveSession's decisions without a model: agreement, finals, endpoints, backpressure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from inference_service.engines.buffer_decoder import DecodedSegment, Hypothesis
from inference_service.engines.speech_detector import CHUNK
from inference_service.engines.whisper import Word
from inference_service.live.session import DecodeJob, LiveResult, LiveSession, LiveSettings, SpeechEvent

STEP = CHUNK / 16000  # seconds per VAD probability


def feed(session: LiveSession, seconds: float, probability: float) -> list[object]:
    steps = round(seconds / STEP)
    return list(session.push(np.zeros(steps * CHUNK, np.float32), [probability] * steps))


def hypothesis(*segments: tuple[float, float, str, bool]) -> Hypothesis:
    return Hypothesis(tuple(DecodedSegment(s, e, t, (), c) for s, e, t, c in segments), 0.0, 0.01, False)


def run(session: LiveSession, *segments: tuple[float, float, str, bool]) -> tuple[DecodeJob, list[object]]:
    job = session.next_job()
    assert job is not None
    return job, list(session.apply(job, hypothesis(*segments)))


def results(events: Sequence[object]) -> list[LiveResult]:
    return [e for e in events if isinstance(e, LiveResult)]


def test_words_two_decodes_agree_on_are_committed_and_the_rest_stays_a_draft() -> None:
    session = LiveSession(LiveSettings(min_cut_buffer=100))
    assert feed(session, 0.5, 0.9) == [SpeechEvent("SPEECH_STARTED", 0.0)]
    _, first = run(session, (0.0, 0.5, "good morning", False))
    assert results(first)[0].stability == 0.0 and not results(first)[0].is_final
    feed(session, 0.35, 0.9)
    _, second = run(session, (0.0, 0.8, "good morning and", False))
    draft = results(second)[0]
    assert draft.text == "good morning and" and draft.stability == 2 / 3 and draft.result_id == "1"


def test_an_agreed_sentence_before_a_pause_is_final_before_the_endpoint_and_never_repeated() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 1.0, 0.9)
    run(session, (0.0, 1.0, "Hello there.", True))
    feed(session, 0.2, 0.0)  # the pause begins
    _, events = run(session, (0.0, 1.0, "Hello there.", True))
    final = results(events)
    assert [(r.text, r.is_final) for r in final] == [("Hello there.", True)]
    assert final[0].end >= 1.0 - 1e-6  # where the VAD heard the speech stop
    events = feed(session, 0.4, 0.0)
    assert [e.kind for e in events if isinstance(e, SpeechEvent)] == ["END_OF_UTTERANCE"]
    assert session.settle() == [] and session.next_job() is None and not session.has_open_utterance


def test_an_endpoint_finalises_the_whole_utterance_from_a_decode_that_heard_its_end() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 1.0, 0.9)
    run(session, (0.0, 1.0, "one two", False))
    feed(session, 0.6, 0.0)  # silence: the endpoint is reached
    job = session.next_job()
    assert job is not None and job.final
    events = results(session.apply(job, hypothesis((0.0, 1.0, "one two three", True))))
    assert [(r.text, r.is_final, r.result_id) for r in events] == [("one two three", True, "1")]
    feed(session, 0.5, 0.9)
    _, next_events = run(session, (0.0, 0.5, "four", False))
    assert results(next_events)[0].result_id == "2"
    assert results(next_events)[0].start >= events[0].end


def test_a_stream_behind_by_more_than_max_lag_decodes_less_often_on_larger_chunks() -> None:
    session = LiveSession(LiveSettings(max_lag=1.0, decode_interval=0.3))
    feed(session, 0.5, 0.9)
    job = session.next_job()
    assert job is not None
    feed(session, 1.5, 0.9)  # 1.5 s arrived while that decode ran: 1.5 s behind
    session.apply(job, hypothesis((0.0, 0.5, "a", False)))
    assert session.lag > 1.0
    waits = 0
    while (job := session.next_job()) is None:
        feed(session, 0.1, 0.9)
        waits += 1
    assert waits > 0 and job.audio_end - 0.5 >= 2.0 - 1e-6  # one decode over >= 2 x max_lag of new audio
    session.apply(job, hypothesis((0.0, job.audio_end, "a b", False)))
    feed(session, 0.35, 0.9)
    assert session.lag <= 1.0 and session.next_job() is not None  # caught up: the normal cadence again


def test_silence_is_skipped_and_counts_as_processed() -> None:
    session = LiveSession(LiveSettings())
    feed(session, 5.0, 0.0)
    assert session.next_job() is None and session.finish_job() is None
    assert session.lag <= 0.25


def test_the_buffer_is_cut_at_max_buffer_without_agreement() -> None:
    session = LiveSession(LiveSettings(max_buffer=3.0, decode_interval=0.3))
    feed(session, 3.5, 0.9)
    _, events = run(session, (0.0, 2.0, "first part.", True), (2.0, 3.5, "second", False))
    finals = [r for r in results(events) if r.is_final]
    assert [r.text for r in finals] == ["first part."]
    feed(session, 0.5, 0.9)
    job = session.next_job()
    assert job is not None and job.buffer_start >= 2.0 - 1e-6  # the buffer starts at the cut


# ------------------------------------------------------------ a final never repeats its words (issue 10)


def aligned(start: float, end: float, closed: bool, *words: tuple[float, float, str]) -> DecodedSegment:
    """A decoded segment with aligned words (buffer seconds), as with word timestamps on."""
    text = "".join(w for _, _, w in words).strip()
    return DecodedSegment(start, end, text, tuple(Word(s, e, w, 0.9) for s, e, w in words), closed)


JFK_LOOP = (  # what tiny.en made of 2.28 s of JFK's "And so my fellow Americans" (bench, issue 10)
    (0.0, 0.64, " And"),
    (0.64, 0.92, " so"),
    (0.92, 1.32, " my"),
    (1.32, 1.62, " fellow"),
    (1.62, 2.06, " Americans."),
    (2.26, 2.26, " And"),
    (2.26, 2.26, " so"),
    (2.26, 2.26, " my"),
    (2.26, 2.26, " fellow"),
)


def finals_of(events: Sequence[object]) -> list[str]:
    return [r.text for r in results(events) if r.is_final]


def test_a_decode_that_loops_into_the_padding_is_final_once() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 2.3, 0.9)
    job = session.next_job()
    assert job is not None
    drafts = results(session.apply(job, Hypothesis((aligned(0.0, 2.28, False, *JFK_LOOP),), 2.3, 0.01, False)))
    assert [r.text for r in drafts] == ["And so my fellow Americans."]  # the loop is not even a draft
    feed(session, 0.6, 0.0)  # the endpoint: final from the whole utterance
    job = session.next_job()
    assert job is not None and job.final
    events = session.apply(job, Hypothesis((aligned(0.0, 2.28, False, *JFK_LOOP),), 2.3, 0.01, False))
    assert finals_of(events) == ["And so my fellow Americans."]


def test_a_loop_without_word_timestamps_is_cut_where_it_restarts_the_sentence() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 2.3, 0.9)
    run(session, (0.0, 2.28, "And so my fellow Americans. And so my fellow", False))
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final
    events = session.apply(job, hypothesis((0.0, 2.28, "And so my fellow Americans. And so my fellow", False)))
    assert finals_of(events) == ["And so my fellow Americans."]


def test_words_spoken_twice_are_kept() -> None:
    # Real repeats have real durations ("... can do for you, ask what you can do for your country").
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 3.0, 0.9)
    spoken = ((0.0, 0.3, " can"), (0.3, 0.5, " do"), (0.5, 0.7, " for"), (0.7, 1.0, " you,"))
    again = ((1.2, 1.5, " can"), (1.5, 1.7, " do"), (1.7, 1.9, " for"), (1.9, 2.2, " you."))
    run(session)  # the first draft decode: nothing heard yet
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final
    events = session.apply(job, Hypothesis((aligned(0.0, 2.2, True, *spoken, *again),), 3.0, 0.01, False))
    assert finals_of(events) == ["can do for you, can do for you."]
    # and without word timestamps, a repeat that does not restart after a sentence end stays too
    feed(session, 1.0, 0.9)
    run(session, (0.0, 1.0, "No, no", False))
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final
    assert finals_of(session.apply(job, hypothesis((0.0, 1.0, "No, no, no.", True)))) == ["No, no, no."]


def test_an_endpoint_decode_that_restarts_the_utterance_after_a_commit_does_not_repeat_the_final() -> None:
    """A sentence final inside an utterance cuts the buffer; the endpoint's decode of what is
    left, with that sentence as prompt, says its first words again, stamped at the cut."""
    session = LiveSession(LiveSettings(endpoint_silence=0.5, min_cut_buffer=1.0))
    feed(session, 2.6, 0.9)
    sentence = aligned(0.0, 2.06, True, *JFK_LOOP[:5])
    for _ in range(2):  # two decodes agree on the sentence and the first word after it
        job = session.next_job()
        assert job is not None
        events = session.apply(
            job, Hypothesis((sentence, aligned(2.1, 2.6, False, (2.1, 2.5, " Ask"))), 2.6, 0.01, False)
        )
        feed(session, 0.4, 0.9)
    assert finals_of(events) == ["And so my fellow Americans."]
    first = next(r for r in results(events) if r.is_final)
    feed(session, 1.0, 0.9)
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final and job.buffer_start == pytest.approx(first.end, abs=1e-3)
    restarted = aligned(
        0.0,
        2.0,
        False,
        (0.0, 0.0, " And"),
        (0.0, 0.0, " so"),
        (0.0, 0.0, " my"),
        (0.0, 0.0, " fellow"),
        (0.04, 0.5, " Ask"),
        (0.5, 0.9, " not"),
        (0.9, 1.3, " what"),
    )
    events = session.apply(job, Hypothesis((restarted,), 2.0, 0.01, False))
    assert finals_of(events) == ["Ask not what"]


# ------------------------------------------------------------ early guesses and early agreement (issue 10)


def weak(start: float, end: float, *words: tuple[float, float, str, float]) -> DecodedSegment:
    """An open segment of aligned words with their probabilities."""
    text = "".join(w for _, _, w, _ in words).strip()
    return DecodedSegment(start, end, text, tuple(Word(s, e, w, p) for s, e, w, p in words), False)


def decode(session: LiveSession, *segments: DecodedSegment) -> list[LiveResult]:
    job = session.next_job()
    assert job is not None
    return results(session.apply(job, Hypothesis(segments, job.audio_end - job.buffer_start, 0.01, False)))


def test_a_guess_from_a_short_buffer_is_neither_a_draft_nor_a_vote() -> None:
    """The first 0.65 s of JFK's "And so my fellow Americans" came out as "answer and answer
    answer answer" (mean word probability 0.25), of "Ask not" as "S. S.": not sent, and not
    agreed on with the next decode."""
    session = LiveSession(LiveSettings(min_cut_buffer=100))
    feed(session, 0.5, 0.9)
    garbled = weak(0.0, 0.5, (0.0, 0.2, " answer", 0.31), (0.2, 0.22, " and", 0.22), (0.22, 0.45, " answer", 0.21))
    assert decode(session, garbled) == []
    feed(session, 0.35, 0.9)
    assert decode(session, aligned(0.0, 0.8, False, (0.0, 0.3, " S."), (0.3, 0.5, " S."))) == []  # a word twice
    feed(session, 0.35, 0.9)
    first = decode(session, aligned(0.0, 1.2, False, (0.0, 0.4, " And"), (0.4, 0.7, " so"), (0.7, 1.0, " my")))
    assert [(r.text, r.stability) for r in first] == [("And so my", 0.0)]  # nothing agreed on with the guesses


def test_words_two_short_decodes_agreed_on_give_way_to_a_decode_that_heard_more() -> None:
    """tiny.en read the first 0.8 and 1.0 s of "Ask not" as "S" twice, then "Ask not!": the
    final must not be "S not!" (the agreed "S" kept, "not!" lined up after it by time)."""
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 0.8, 0.9)
    assert [r.text for r in decode(session, aligned(0.0, 0.7, False, (0.0, 0.7, " S")))] == ["S"]
    feed(session, 0.35, 0.9)
    assert [
        r.text for r in decode(session, aligned(0.0, 0.9, False, (0.0, 0.9, " S")))
    ] == []  # same text: no new draft
    feed(session, 0.4, 0.9)
    feed(session, 0.2, 0.0)  # a pause after the sentence
    latest = aligned(0.0, 1.4, True, (0.0, 0.76, " Ask"), (0.76, 1.3, " not!"))
    events = decode(session, latest)
    assert [(r.text, r.is_final) for r in events] == [("Ask not!", False)]  # a draft: the two decodes disagree
    feed(session, 0.4, 0.0)  # the endpoint
    job = session.next_job()
    assert job is not None and job.final
    assert finals_of(session.apply(job, Hypothesis((latest,), 1.9, 0.01, False))) == ["Ask not!"]


def test_words_squeezed_against_the_end_of_a_draft_buffer_are_not_shown_until_heard() -> None:
    session = LiveSession(LiveSettings(min_cut_buffer=100))
    feed(session, 1.2, 0.9)
    job = session.next_job()
    assert job is not None
    end = job.audio_end - job.buffer_start
    guessed = aligned(
        0.0, end, False, (0.0, 0.5, " like"), (0.5, 0.8, " your"), (0.8, 1.0, " country,"), (end, end, " like")
    )
    assert [r.text for r in results(session.apply(job, Hypothesis((guessed,), end, 0.01, False)))] == [
        "like your country,"
    ]
    # at an endpoint the audio runs on past the speech: a final keeps its last word
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final
    end = job.audio_end - job.buffer_start
    heard = aligned(
        0.0, end, False, (0.0, 0.5, " what"), (0.5, 0.8, " your"), (0.8, 1.15, " country"), (end, end, " do")
    )
    assert finals_of(session.apply(job, Hypothesis((heard,), end, 0.01, False))) == ["what your country do"]


def test_results_carry_words_only_when_asked_for() -> None:
    for report in (True, False):
        session = LiveSession(LiveSettings(report_words=report))
        feed(session, 0.5, 0.9)
        (draft,) = decode(session, aligned(0.0, 0.5, False, (0.0, 0.2, " good"), (0.2, 0.45, " morning")))
        assert [w.word.strip() for w in draft.words] == (["good", "morning"] if report else [])


def test_speech_heard_while_an_endpoint_final_is_pending_is_neither_lost_nor_merged() -> None:
    # On a loaded machine the endpoint's final decode runs seconds late: the next sentence
    # ("First, ...") began and ended, and a third ("Second, ...") began before it was applied.
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 1.0, 0.9)
    feed(session, 0.6, 0.0)  # the endpoint of "Hello there."
    job = session.next_job()
    assert job is not None and job.final
    first_onset = session.received
    feed(session, 1.5, 0.9)  # "First, the server is online." while the final decode runs
    first_end = session.received
    feed(session, 0.6, 0.0)
    second_onset = session.received
    feed(session, 0.5, 0.9)  # "Second, ..." is being spoken
    events = session.apply(job, hypothesis((0.0, 1.0, "Hello there.", True)))
    assert [r.text for r in results(events)] == ["Hello there."]
    speech = [(e.kind, e.time) for e in events if isinstance(e, SpeechEvent)]
    assert speech == [("SPEECH_STARTED", pytest.approx(first_onset)), ("END_OF_UTTERANCE", pytest.approx(first_end))]
    first_job = session.next_job()
    assert first_job is not None and first_job.final
    assert first_job.buffer_start <= first_onset and first_job.audio_end < second_onset
    events = session.apply(first_job, hypothesis((0.0, 1.7, "First, the server is online.", True)))
    assert [r.text for r in results(events)] == ["First, the server is online."]
    assert [(e.kind, e.time) for e in events if isinstance(e, SpeechEvent)] == [
        ("SPEECH_STARTED", pytest.approx(second_onset))
    ]
    draft_job = session.next_job()
    assert draft_job is not None and not draft_job.final and draft_job.buffer_start <= second_onset


def test_speech_that_ended_while_an_endpoint_final_was_pending_gets_its_own_endpoint() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 1.0, 0.9)
    feed(session, 0.6, 0.0)
    job = session.next_job()
    assert job is not None and job.final
    feed(session, 1.5, 0.9)  # a whole sentence while the final decode runs
    feed(session, 1.0, 0.0)  # and the silence after it
    events = session.apply(job, hypothesis((0.0, 1.0, "Hello there.", True)))
    kinds = [e.kind for e in events if isinstance(e, SpeechEvent)]
    assert kinds == ["SPEECH_STARTED", "END_OF_UTTERANCE"]
    final_job = session.next_job()
    assert final_job is not None and final_job.final and final_job.audio_end > 1.6 + 1.5
    events = session.apply(final_job, hypothesis((0.0, 1.5, "First, the server is online.", True)))
    assert [(r.text, r.is_final) for r in results(events)] == [("First, the server is online.", True)]


def test_no_draft_starts_in_a_pause_and_the_decode_when_speech_ends_is_urgent() -> None:
    session = LiveSession(LiveSettings(decode_interval=0.3, speech_end_silence=0.15, endpoint_silence=0.5))
    feed(session, 1.0, 0.9)
    run(session, (0.0, 1.0, "one two", False))
    feed(session, 0.4, 0.9)  # a draft is due (0.4 s of new audio)...
    feed(session, 0.1, 0.0)  # ...but the speech paused: the decode at speech_end_silence comes next
    assert session.next_job() is None and not session.urgent_job_due()
    feed(session, 0.1, 0.0)
    assert session.urgent_job_due()
    job = session.next_job()
    assert job is not None and job.urgent and not job.final
    session.apply(job, hypothesis((0.0, 1.4, "one two three", False)))
    assert not session.urgent_job_due()  # that decode heard the pause out
    feed(session, 0.4, 0.0)  # the endpoint
    assert session.urgent_job_due()


def test_an_endpoint_job_is_final_and_urgent() -> None:
    session = LiveSession(LiveSettings(endpoint_silence=0.5))
    feed(session, 0.5, 0.9)
    assert not session.urgent_job_due()
    feed(session, 0.6, 0.0)  # no decode ran yet: the endpoint's
    assert session.urgent_job_due()
    job = session.next_job()
    assert job is not None and job.final and job.urgent
