"""Audio that decodes to something pathological is refused fast, within bounded memory:
a declared length over the limit, more audio than the header declares, a sample rate no
recording has, a corrupt container. Unit level and through Transcribe on a real server."""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from inference_service.audio import decode_audio
from inference_service.errors import AudioTooLarge, InvalidAudio
from tests.support import InferenceHandle
from voxserve.inference.v1 import inference_pb2 as pb


def sox(path: Path, *effect: str, rate: int = 16000) -> bytes:
    subprocess.run(["sox", "-n", "-r", str(rate), "-c", "1", str(path), *effect], check=True, timeout=60)
    return path.read_bytes()


def one_hertz_wav(tmp_path: Path) -> bytes:
    """A WAV whose header says 1 Hz: 2 s of samples would 'last' 32000 s at 16 kHz."""
    wav = bytearray(sox(tmp_path / "tone.wav", "synth", "2", "sine", "440"))
    fmt = wav.find(b"fmt ")
    struct.pack_into("<I", wav, fmt + 12, 1)  # sample rate
    struct.pack_into("<I", wav, fmt + 16, 2)  # byte rate
    return bytes(wav)


def test_a_declared_length_over_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    data = sox(tmp_path / "thirty.wav", "synth", "30", "sine", "440")
    with pytest.raises(AudioTooLarge, match="declares 30 s, over the limit of 10 s"):
        decode_audio(data, max_seconds=10)


def test_decoding_stops_at_the_limit_when_the_header_understates(tmp_path: Path) -> None:
    # A chained Ogg file declares its last link's length (30 s) but holds 40 s.
    chained = sox(tmp_path / "a.ogg", "synth", "10", "sine", "300") + sox(
        tmp_path / "b.ogg", "synth", "30", "sine", "500"
    )
    assert len(decode_audio(chained)) / 16000 == pytest.approx(40, abs=0.1)
    with pytest.raises(AudioTooLarge, match="longer than the limit of 35 s"):
        decode_audio(chained, max_seconds=35)


def test_a_sample_rate_no_recording_has_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(InvalidAudio, match="1 Hz"):
        decode_audio(one_hertz_wav(tmp_path))


def test_a_corrupt_container_is_invalid(tmp_path: Path) -> None:
    data = sox(tmp_path / "tone.ogg", "synth", "3", "sine", "440")
    with pytest.raises(InvalidAudio):
        decode_audio(data[:150])  # cut inside the headers


def test_transcribe_refuses_pathological_audio_with_a_clear_status(
    start_inference: Callable[..., InferenceHandle], tmp_path: Path
) -> None:
    inference = start_inference()
    cases = {
        "1 Hz": (one_hertz_wav(tmp_path), grpc.StatusCode.INVALID_ARGUMENT),
        "garbage": (b"RIFF\x00\x00\x00\x00WAVEjunk" * 50, grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (audio, expected) in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            list(inference.stub.Transcribe(pb.TranscribeRequest(audio=audio), timeout=60))
        assert caught.value.code() == expected, (name, caught.value.details())
        assert caught.value.details(), name
    assert inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10) is not None
