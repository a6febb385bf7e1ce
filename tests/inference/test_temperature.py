"""TranscribeOptions.temperature: unset = faster-whisper's schedule, set = that temperature only,
outside 0..1 = INVALID_ARGUMENT; checked on real decodes of real speech."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest

from inference_service.audio import decode_audio
from inference_service.engines.device import DeviceChoice
from inference_service.engines.whisper import DEFAULT_TEMPERATURES, TranscribeOptions, WhisperEngine
from inference_service.errors import InvalidOptions
from tests.support import DATA_DIR, TINY_EN_DIR, TRANSCRIPTS, InferenceHandle, transcribe, word_error_rate

SHORT = "speech_short.wav"
# tiny.en on this sentence: WER 0 at temperature 0; sampling at 0.2 (best of 5) stays close.
WER_BOUND = 0.35


@pytest.fixture(scope="module")
def whisper() -> Iterator[WhisperEngine]:
    engine = WhisperEngine.load("tiny.en", TINY_EN_DIR, DeviceChoice("cpu", "int8"), cpu_threads=2)
    yield engine
    engine.close()


def test_a_set_temperature_is_the_only_one_the_decode_uses(whisper: WhisperEngine) -> None:
    audio = decode_audio((DATA_DIR / SHORT).read_bytes())
    _, segments = whisper.transcribe(audio, TranscribeOptions(temperature=0.2))
    decoded = list(segments)
    assert decoded
    # faster-whisper records the temperature each segment was decoded at: the option reached it.
    assert {s.temperature for s in decoded} == {0.2}
    assert word_error_rate(TRANSCRIPTS[SHORT], " ".join(s.text for s in decoded)) <= WER_BOUND


def test_unset_temperature_keeps_the_default_schedule(whisper: WhisperEngine) -> None:
    assert TranscribeOptions().temperatures == DEFAULT_TEMPERATURES
    assert TranscribeOptions(temperature=0.0).temperatures == (0.0,)
    audio = decode_audio((DATA_DIR / SHORT).read_bytes())
    _, segments = whisper.transcribe(audio, TranscribeOptions())
    decoded = list(segments)
    assert {s.temperature for s in decoded} == {0.0}  # clean speech passes at the first step
    assert word_error_rate(TRANSCRIPTS[SHORT], " ".join(s.text for s in decoded)) <= WER_BOUND


def test_the_batched_pipeline_gets_the_temperature_too(whisper: WhisperEngine) -> None:
    audio = decode_audio((DATA_DIR / SHORT).read_bytes())
    _, segments = whisper.transcribe_batched(audio, TranscribeOptions(temperature=0.2), batch_size=2)
    decoded = list(segments)
    assert decoded and {s.temperature for s in decoded} == {0.2}


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan, math.inf])
def test_a_temperature_outside_0_to_1_is_invalid(whisper: WhisperEngine, value: float) -> None:
    with pytest.raises(InvalidOptions, match="temperature must be between 0 and 1"):
        whisper.validate(TranscribeOptions(temperature=value))


def test_the_proto_float_is_rounded_back_to_what_the_client_meant(whisper: WhisperEngine) -> None:
    float32_of_0_2 = 0.20000000298023224
    assert whisper.validate(TranscribeOptions(temperature=float32_of_0_2)).temperature == 0.2


def test_transcribe_with_temperature_0_2_returns_the_transcript(inference: InferenceHandle) -> None:
    events = transcribe(inference, (DATA_DIR / SHORT).read_bytes(), temperature=0.2)
    assert events[-1].WhichOneof("event") == "completed"
    text = events[-1].completed.text
    assert word_error_rate(TRANSCRIPTS[SHORT], text) <= WER_BOUND, text
    # The same values at the extremes are accepted too.
    for value in (0.0, 1.0):
        assert transcribe(inference, (DATA_DIR / SHORT).read_bytes(), temperature=value)[-1].HasField("completed")


@pytest.mark.parametrize("value", [-0.5, 1.01, 2.0])
def test_transcribe_with_a_temperature_outside_0_to_1_is_invalid_argument(
    inference: InferenceHandle, value: float
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        transcribe(inference, (DATA_DIR / SHORT).read_bytes(), temperature=value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature must be between 0 and 1" in (info.value.details() or "")


def test_the_live_decoder_samples_at_a_set_temperature_and_still_transcribes(whisper: WhisperEngine) -> None:
    from inference_service.engines.buffer_decoder import BufferDecoder, DecodeSettings

    audio = decode_audio((DATA_DIR / SHORT).read_bytes())
    for temperature in (None, 0.0, 0.2):
        decoder = BufferDecoder(whisper.whisper_model, DecodeSettings("en", "transcribe", 5, False, None, temperature))
        text = " ".join(s.text for s in decoder.decode(audio, "").segments)
        assert word_error_rate(TRANSCRIPTS[SHORT], text) <= WER_BOUND, (temperature, text)
