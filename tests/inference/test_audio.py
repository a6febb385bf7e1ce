"""Decoding uploaded bytes: real files from tests/data and the ways uploads go wrong."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from inference_service.audio import audio_duration, check_audio_size, decode_audio, resample, to_mono
from inference_service.errors import AudioTooLarge, InvalidAudio
from voxserve_common.errors import InvalidArgument, ResourceExhausted

DATA = Path(__file__).resolve().parents[1] / "data"


def wav_frames(path: Path) -> tuple[int, int]:
    with wave.open(str(path)) as w:
        return w.getnframes(), w.getframerate()


def test_wav_decodes_to_16k_mono_float32_with_every_sample() -> None:
    frames, rate = wav_frames(DATA / "speech_short.wav")
    audio = decode_audio((DATA / "speech_short.wav").read_bytes())
    assert rate == 16000
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert audio.shape[0] == frames
    assert 0.1 < float(np.abs(audio).max()) <= 1.0
    assert audio_duration(audio, 16000) == pytest.approx(frames / 16000)


def test_ogg_decodes_to_the_same_duration_as_the_wav() -> None:
    wav = decode_audio((DATA / "speech_short.wav").read_bytes())
    ogg = decode_audio((DATA / "speech_short.ogg").read_bytes())
    assert ogg.dtype == np.float32 and ogg.ndim == 1
    assert audio_duration(ogg, 16000) == pytest.approx(audio_duration(wav, 16000), abs=0.03)
    assert 0.1 < float(np.abs(ogg).max()) <= 1.5


def test_decode_resamples_to_stereo_44k_for_demucs() -> None:
    frames, rate = wav_frames(DATA / "speech_short.wav")
    audio = decode_audio((DATA / "speech_short.wav").read_bytes(), sampling_rate=44100, channels=2)
    assert audio.dtype == np.float32 and audio.shape[0] == 2
    assert audio.shape[1] == pytest.approx(frames * 44100 / rate, abs=50)
    np.testing.assert_allclose(audio[0], audio[1])


def test_silence_decodes_to_five_seconds_of_zeros() -> None:
    audio = decode_audio((DATA / "silence.wav").read_bytes())
    assert audio_duration(audio, 16000) == pytest.approx(5.0)
    assert not audio.any()


def test_empty_bytes_are_invalid_audio() -> None:
    with pytest.raises(InvalidAudio, match="empty"):
        decode_audio(b"")


def test_random_bytes_are_invalid_audio() -> None:
    with pytest.raises(InvalidAudio, match="not a media file"):
        decode_audio(np.random.default_rng(0).bytes(4096))


def test_text_file_is_invalid_audio() -> None:
    text = b"This is a plain text file, not a recording of anyone speaking.\n" * 20
    with pytest.raises(InvalidAudio, match="not a media file"):
        decode_audio(text)


def test_video_without_audio_stream_is_invalid_audio() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(InvalidAudio, match="no audio stream, only: video"):
        decode_audio(buf.getvalue())


def test_wav_with_zero_frames_contains_no_audio_samples() -> None:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    with pytest.raises(InvalidAudio, match="contains no audio samples"):
        decode_audio(buf.getvalue())


def test_unsupported_channel_count_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="channels must be 1"):
        decode_audio((DATA / "speech_short.wav").read_bytes(), channels=6)


def test_size_limit_names_both_numbers() -> None:
    check_audio_size(1000, 1000)
    check_audio_size(10**9, 0)  # 0 means no limit
    with pytest.raises(AudioTooLarge, match=r"1001 bytes.*limit of 1000 bytes") as caught:
        check_audio_size(1001, 1000)
    assert isinstance(caught.value, ResourceExhausted)


def test_resample_and_to_mono_keep_a_tone_at_its_pitch() -> None:
    t = np.arange(44100, dtype=np.float32) / 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    mono = resample(to_mono(np.stack([tone, tone])), 44100, 16000)
    assert mono.dtype == np.float32 and mono.shape == (pytest.approx(16000, abs=20),)
    spectrum = np.abs(np.fft.rfft(mono[:16000]))
    assert np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(spectrum)] == pytest.approx(440, abs=2)
    assert float(np.sqrt(np.mean(mono[1000:-1000] ** 2))) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
