"""Transcribe through the real services: tiny.en from the store, real speech, real words."""

from __future__ import annotations

import grpc
import pytest

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, transcribe, word_error_rate
from voxserve.inference.v1 import inference_pb2 as pb


def segments_of(events: list[pb.TranscribeEvent]) -> list[pb.Segment]:
    return [e.segment for e in events if e.WhichOneof("event") == "segment"]


def test_tiny_en_transcribes_generated_speech_wer_below_0_25(inference: InferenceHandle) -> None:
    audio = (DATA_DIR / "speech_short.wav").read_bytes()
    events = transcribe(inference, audio, word_timestamps=True)
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "accepted" and kinds[-1] == "completed"
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.job_id for e in events}) == 1
    text = " ".join(s.text for s in segments_of(events))
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text) <= 0.25, text
    info = next(e.info for e in events if e.WhichOneof("event") == "info")
    assert info.language == "en" and info.duration == pytest.approx(3.24, abs=0.1)
    all_words = [w for s in segments_of(events) for w in s.words]
    assert all_words and all(0 <= w.start <= w.end <= info.duration + 0.05 for w in all_words)
    completed = events[-1].completed
    assert completed.audio_seconds == pytest.approx(info.duration, abs=0.01)
    assert completed.real_time_factor > 0 and completed.cache_hit is False
    assert completed.text.strip() == text.strip()
    phases = [e.progress.phase for e in events if e.WhichOneof("event") == "progress"]
    assert pb.DECODING in phases and pb.LOADING_MODEL in phases and pb.TRANSCRIBING in phases and phases[-1] == pb.DONE


def test_second_request_is_a_cache_hit(inference: InferenceHandle) -> None:
    audio = (DATA_DIR / "speech_short.ogg").read_bytes()
    transcribe(inference, audio)
    events = transcribe(inference, audio)
    assert events[-1].completed.cache_hit is True
    stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest())
    loaded = {m.model_id: m for m in inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
    assert loaded["whisper-tiny.en"].hits >= 1
    # Every model was loaded once (with fast_first_segment, the default, the VAD model too).
    assert stats.misses == stats.loads == len(loaded)


def test_segments_stream_before_completed(inference: InferenceHandle) -> None:
    audio = (DATA_DIR / "speech_multi.wav").read_bytes()
    events = transcribe(inference, audio)
    kinds = [e.WhichOneof("event") for e in events]
    first_segment = kinds.index("segment")
    assert first_segment < kinds.index("completed")
    assert kinds.count("segment") >= 3
    text = " ".join(s.text for s in segments_of(events))
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], text) <= 0.35, text


@pytest.mark.parametrize("vad_filter", [True, False])
def test_silence_gives_empty_transcript(inference: InferenceHandle, vad_filter: bool) -> None:
    events = transcribe(inference, (DATA_DIR / "silence.wav").read_bytes(), vad_filter=vad_filter)
    assert segments_of(events) == []
    assert events[-1].completed.segments == 0
    assert events[-1].completed.audio_seconds == pytest.approx(5.0, abs=0.05)


@pytest.mark.parametrize(
    "audio, code, fragment",
    [
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"this is not audio at all" * 20, grpc.StatusCode.INVALID_ARGUMENT, "not a media file"),
    ],
)
def test_bad_audio(inference: InferenceHandle, audio: bytes, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        transcribe(inference, audio)
    assert info.value.code() == code
    assert fragment in info.value.details().lower()


def test_unknown_and_wrong_kind_models(inference: InferenceHandle) -> None:
    audio = (DATA_DIR / "speech_short.wav").read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        transcribe(inference, audio, model_id="no-such-model")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        transcribe(inference, audio, model_id="silero-vad")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "vad" in info.value.details() and "whisper" in info.value.details()
