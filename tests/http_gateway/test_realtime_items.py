"""The Realtime mapping without servers: session updates in both dialects, the StreamingConfig
they make, and the items, deltas and completions an ItemTracker makes of a live stream's
responses (orders the real engine produces rarely: a final after its utterance, a clear while
a final is pending, a failed stream)."""

from __future__ import annotations

from typing import Any

import pytest

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_http.realtime.calls import streaming_config
from voxserve_http.realtime.items import Conversation, ItemTracker, agreed_words
from voxserve_http.realtime.protocol import (
    BETA,
    GA,
    EventError,
    SessionConfig,
    TurnDetection,
    session_object,
    updated_config,
)


def speech(kind: int, time: float) -> ipb.StreamingTranscribeResponse:
    return ipb.StreamingTranscribeResponse(speech_event=ipb.SpeechEvent(type=kind, time=time))


def result(text: str, final: bool, end: float, stability: float = 1.0) -> ipb.StreamingTranscribeResponse:
    message = ipb.StreamingResult(is_final=final, text=text, end=end, stability=stability)
    return ipb.StreamingTranscribeResponse(result=message)


def completed() -> ipb.StreamingTranscribeResponse:
    return ipb.StreamingTranscribeResponse(completed=ipb.Completed())


def feed(tracker: ItemTracker, *responses: ipb.StreamingTranscribeResponse) -> list[dict[str, Any]]:
    return [event for response in responses for event in tracker.on_response(response)]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"].removeprefix("conversation.item.input_audio_transcription.") for e in events]


def test_beta_and_ga_updates_make_the_same_config() -> None:
    beta = {
        "type": "transcription_session.update",
        "session": {
            "input_audio_format": "pcm16",
            "input_audio_transcription": {"model": "whisper-tiny.en", "language": "EN", "prompt": "Budget."},
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.6,
                "prefix_padding_ms": 200,
                "silence_duration_ms": 700,
            },
        },
    }
    ga = {
        "type": "session.update",
        "session": {
            "type": "transcription",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "whisper-tiny.en", "language": "en", "prompt": "Budget."},
                    "turn_detection": {
                        "type": "server_vad",
                        "threshold": 0.6,
                        "prefix_padding_ms": 200,
                        "silence_duration_ms": 700,
                    },
                }
            },
        },
    }
    from_beta, dialect = updated_config(SessionConfig(), beta)
    from_ga, other = updated_config(SessionConfig(), ga)
    assert (dialect, other) == (BETA, GA)
    assert (
        from_beta == from_ga == SessionConfig("whisper-tiny.en", "en", "Budget.", 24000, TurnDetection(0.6, 200, 700))
    )
    manual, _ = updated_config(from_beta, {"type": "transcription_session.update", "session": {"turn_detection": None}})
    assert manual.manual and manual.model == "whisper-tiny.en"  # fields not named keep their values
    assert session_object("s", manual, GA)["audio"]["input"]["turn_detection"] is None
    assert session_object("s", manual, BETA)["input_audio_format"] == "pcm16"


@pytest.mark.parametrize(
    ("session", "param"),
    [
        ({"input_audio_format": "g711_ulaw"}, "session.input_audio_format"),
        ({"input_audio_format": {"type": "audio/pcm", "rate": 1000}}, "session.input_audio_format.rate"),
        ({"turn_detection": {"type": "semantic_vad"}}, "session.turn_detection.type"),
        ({"turn_detection": {"threshold": 2}}, "session.turn_detection.threshold"),
        ({"input_audio_transcription": {"language": "english!"}}, "session.input_audio_transcription.language"),
        ({"input_audio_transcription": {"model": "../etc"}}, "session.input_audio_transcription.model"),
        ({"input_audio_transcription": {"prompt": 7}}, "session.input_audio_transcription.prompt"),
    ],
)
def test_an_update_that_cannot_apply_names_its_field(session: dict[str, Any], param: str) -> None:
    with pytest.raises(EventError) as caught:
        updated_config(SessionConfig(), {"type": "transcription_session.update", "session": session})
    assert caught.value.param == param


def test_turn_detection_maps_onto_the_engines_endpointing() -> None:
    config = streaming_config(SessionConfig(rate=16000, turn_detection=TurnDetection(0.7, 250, 800)), "m")
    assert (config.sample_rate_hertz, config.encoding, config.interim_results) == (16000, ipb.LINEAR16, True)
    assert config.endpoint_silence_seconds == pytest.approx(0.8)
    assert config.speech_threshold == pytest.approx(0.7) and config.speech_pad_seconds == pytest.approx(0.25)
    manual = streaming_config(SessionConfig(turn_detection=None), "")
    assert not manual.HasField("speech_threshold") and manual.endpoint_silence_seconds == 0  # service defaults


def test_an_utterance_is_an_item_its_agreed_words_deltas_and_its_final_the_completion() -> None:
    tracker = ItemTracker(Conversation(), manual=False, offset_ms=1000, pad=0.3)
    events = feed(
        tracker,
        speech(ipb.SPEECH_STARTED, 0.5),
        result("Good morning and", False, 1.0, stability=0.0),
        result("Good morning and welcome", False, 1.3, stability=0.75),
        speech(ipb.END_OF_UTTERANCE, 2.0),
        result("Good morning, and welcome.", True, 2.0),
    )
    assert kinds(events) == [
        "input_audio_buffer.speech_started",
        "delta",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.created",
        "delta",
        "completed",
    ]
    assert events[0]["audio_start_ms"] == 1200 and events[2]["audio_end_ms"] == 3000
    # "and" was agreed too, but it is the last agreed word: held back, and so is no comma
    assert [e["delta"] for e in events if e["type"].endswith(".delta")] == ["Good morning", ", and welcome."]
    assert events[-1]["transcript"] == "Good morning, and welcome."
    assert len({e["item_id"] for e in events if "item_id" in e}) == 1


def test_a_delta_is_never_taken_back_the_completion_has_the_final_text() -> None:
    tracker = ItemTracker(Conversation(), manual=False)
    events = feed(
        tracker,
        speech(ipb.SPEECH_STARTED, 0.0),
        result("First... the new test", False, 1.0, stability=0.75),
        speech(ipb.END_OF_UTTERANCE, 2.0),
        result("First, the new test server.", True, 2.0),
    )
    assert [e["delta"] for e in events if e["type"].endswith(".delta")] == ["First... the"]
    assert events[-1]["transcript"] == "First, the new test server."


def test_a_final_before_the_endpoint_completes_the_item_at_the_endpoint_and_deltas_add_up() -> None:
    tracker = ItemTracker(Conversation(), manual=False)
    events = feed(
        tracker,
        speech(ipb.SPEECH_STARTED, 0.0),
        result("Hello there. How", False, 1.0, stability=1.0),
        result("Hello there.", True, 1.2),
        speech(ipb.END_OF_UTTERANCE, 1.2),
    )
    assert kinds(events)[-1] == "completed"
    deltas = "".join(e["delta"] for e in events if e["type"].endswith(".delta"))
    assert deltas == events[-1]["transcript"] == "Hello there."


def test_a_final_after_its_utterance_completed_becomes_an_item_of_its_own() -> None:
    conversation = Conversation()
    tracker = ItemTracker(conversation, manual=False)
    first = feed(tracker, speech(ipb.SPEECH_STARTED, 0.0), speech(ipb.END_OF_UTTERANCE, 1.0), result("One.", True, 1.0))
    late = feed(tracker, result("Two.", True, 1.5))
    assert kinds(late) == ["input_audio_buffer.committed", "conversation.item.created", "delta", "completed"]
    assert late[0]["previous_item_id"] == first[-1]["item_id"] and late[-1]["transcript"] == "Two."


def test_manual_commits_hold_deltas_until_the_commit_and_complete_at_the_end_of_the_stream() -> None:
    tracker = ItemTracker(Conversation(), manual=True)
    early = feed(tracker, speech(ipb.SPEECH_STARTED, 0.0), result("Please send the report", False, 1.0, 1.0))
    assert early == []  # no speech events and nothing before the commit, as OpenAI orders them
    committed = tracker.commit()
    assert kinds(committed) == ["input_audio_buffer.committed", "conversation.item.created", "delta"]
    assert committed[-1]["delta"] == "Please send the"
    rest = feed(tracker, result("Please send the report to my office today.", True, 3.0), completed())
    assert (
        kinds(rest) == ["delta", "completed"] and rest[-1]["transcript"] == "Please send the report to my office today."
    )
    assert feed(tracker, completed()) == []  # completed once


def test_after_a_clear_only_a_committed_item_still_completes() -> None:
    tracker = ItemTracker(Conversation(), manual=False)
    feed(tracker, speech(ipb.SPEECH_STARTED, 0.0), speech(ipb.END_OF_UTTERANCE, 1.0))
    tracker.drain()
    events = feed(tracker, result("Kept.", True, 1.0), speech(ipb.SPEECH_STARTED, 2.0), result("Dropped", True, 3.0))
    assert kinds(events) == ["delta", "completed"] and events[-1]["transcript"] == "Kept."
    assert feed(tracker, completed()) == []


def test_a_failed_stream_fails_the_item_the_client_was_told_about() -> None:
    tracker = ItemTracker(Conversation(), manual=False)
    feed(tracker, speech(ipb.SPEECH_STARTED, 0.0))
    (failed,) = tracker.fail({"type": "server_error", "code": "unavailable", "message": "down", "param": None})
    assert (
        failed["type"] == "conversation.item.input_audio_transcription.failed"
        and failed["error"]["code"] == "unavailable"
    )


def test_agreed_words_hold_back_the_last_agreed_word_and_its_punctuation() -> None:
    draft = ipb.StreamingResult(text="First... the new test", stability=0.75)
    assert agreed_words(draft) == "First... the"
    assert agreed_words(ipb.StreamingResult(text="First... the", stability=1.0)) == "First"
    assert agreed_words(ipb.StreamingResult(text="one two", stability=0.0)) == ""
