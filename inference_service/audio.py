"""Turns uploaded audio bytes (any container PyAV/FFmpeg reads) into float32 arrays for the models."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import av
import av.error
import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from inference_service.errors import AudioTooLarge, InvalidAudio
from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)

WHISPER_SAMPLE_RATE = 16000
# Longest audio one request may decode to (a long meeting). A tiny compressed file can
# declare or hold hours of silence: decoded at 16 kHz float32 each hour takes 230 MB, so
# decoding stops as soon as the limit is passed, and a declared duration over it is refused
# before anything is decoded.
MAX_AUDIO_SECONDS = 3 * 3600.0
# Sample rates a real recording has; outside them a header is lying (a 1 Hz "recording"
# resampled to 16 kHz would multiply its size by 16000).
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1_000, 768_000
_LAYOUTS = {1: "mono", 2: "stereo"}
_SEND_INSTEAD = "send a WAV, FLAC, OGG, MP3 or M4A file"

FloatArray = npt.NDArray[np.float32]


def check_audio_size(nbytes: int, limit: int) -> None:
    """Refuse audio over ``limit`` bytes before decoding it (``limit <= 0`` means no limit).

    Raises:
        AudioTooLarge: with the size and the limit, so the client knows how much to cut.
    """
    if limit > 0 and nbytes > limit:
        raise AudioTooLarge(
            f"audio is {nbytes} bytes, over the limit of {limit} bytes; "
            "send a shorter clip or a compressed format (OGG, MP3)"
        )


def audio_duration(samples: np.ndarray, rate: int) -> float:
    """Seconds of audio in ``samples`` (shape ``(n,)`` or ``(channels, n)``) at ``rate`` Hz."""
    if rate <= 0:
        raise InvalidArgument(f"sample rate must be positive, got {rate}")
    return float(samples.shape[-1]) / rate


def _layout(channels: int) -> str:
    try:
        return _LAYOUTS[channels]
    except KeyError:
        raise InvalidArgument(f"channels must be 1 (mono) or 2 (stereo), got {channels}") from None


def _reason(exc: Exception) -> str:
    """FFmpeg's own words for a failure, without errno numbers and file names."""
    return str(getattr(exc, "strerror", None) or exc)


def _decoded_frames(container: av.container.InputContainer) -> Iterator[av.AudioFrame]:
    """Yield the audio frames of the first audio stream, skipping frames FFmpeg cannot decode."""
    stream = container.streams.audio[0]
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            logger.debug("skipping an undecodable audio packet")
            continue
        yield from frames


def _check_stream(stream: Any, max_seconds: float) -> None:
    """Refuse a stream whose header already says it is unusable, before decoding it."""
    rate = stream.sample_rate or 0
    if rate and not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise InvalidAudio(
            f"the audio declares a sample rate of {rate} Hz, outside {MIN_SOURCE_RATE}-{MAX_SOURCE_RATE} Hz; "
            f"{_SEND_INSTEAD}"
        )
    declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if declared > max_seconds:
        raise AudioTooLarge(
            f"the audio declares {declared:.0f} s, over the limit of {max_seconds:.0f} s per request; "
            "split it or send a shorter clip"
        )


def decode_audio(
    data: bytes,
    sampling_rate: int = WHISPER_SAMPLE_RATE,
    channels: int = 1,
    max_seconds: float = MAX_AUDIO_SECONDS,
) -> FloatArray:
    """Decode and resample audio bytes in memory (no ffmpeg binary, no temp file).

    Returns float32 in [-1, 1]: shape ``(samples,)`` when ``channels == 1``, else
    ``(channels, samples)``. Memory stays within ``max_seconds`` of output audio.

    Raises:
        InvalidAudio: empty bytes, bytes FFmpeg cannot read as a media file, a file with
            no audio stream, one whose audio stream decodes to zero samples, or a sample
            rate no recording has.
        AudioTooLarge: the audio declares or decodes to more than ``max_seconds``.
        InvalidArgument: an unsupported ``channels`` or ``sampling_rate``.
    """
    layout = _layout(channels)
    if sampling_rate <= 0:
        raise InvalidArgument(f"sampling rate must be positive, got {sampling_rate}")
    if not data:
        raise InvalidAudio(f"the audio is empty (0 bytes); {_SEND_INSTEAD}")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidAudio(
            f"the {len(data)} bytes sent are not a media file FFmpeg can read ({_reason(exc)}); {_SEND_INSTEAD}"
        ) from exc
    chunks: list[np.ndarray] = []
    with container:
        if not container.streams.audio:
            kinds: list[str] = sorted({str(s.type) for s in container.streams}) or ["none"]
            raise InvalidAudio(
                f"the file ({container.format.name}) has no audio stream, only: {', '.join(kinds)}; {_SEND_INSTEAD}"
            )
        _check_stream(container.streams.audio[0], max_seconds)
        # The source's rate, on the caller's span (inference.audio_decode) when there is one.
        trace.get_current_span().set_attribute(
            "voxserve.audio.sample_rate", container.streams.audio[0].sample_rate or 0
        )
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=sampling_rate)
        limit = int(max_seconds * sampling_rate)
        decoded = 0
        try:
            for frame in _decoded_frames(container):
                if frame.sample_rate and not MIN_SOURCE_RATE <= frame.sample_rate <= MAX_SOURCE_RATE:
                    raise InvalidAudio(f"a frame has a sample rate of {frame.sample_rate} Hz; {_SEND_INSTEAD}")
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                    decoded += out.samples
                if decoded > limit:
                    raise AudioTooLarge(
                        f"the audio is longer than the limit of {max_seconds:.0f} s per request; "
                        "split it or send a shorter clip"
                    )
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as exc:
            raise InvalidAudio(f"the audio stream could not be decoded ({_reason(exc)}); {_SEND_INSTEAD}") from exc
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    if audio.shape[1] == 0:
        raise InvalidAudio(f"the file has an audio stream but it contains no audio samples; {_SEND_INSTEAD}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    return audio[0] if channels == 1 else audio


def to_mono(samples: np.ndarray) -> FloatArray:
    """Average ``(channels, n)`` to ``(n,)``; a 1-D array is returned as float32 unchanged."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise InvalidAudio(f"audio must be (samples,) or (channels, samples), got shape {samples.shape}")
    return np.ascontiguousarray(samples.mean(axis=0), dtype=np.float32)


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> FloatArray:
    """Resample ``(n,)`` or ``(channels, n)`` float audio with FFmpeg's resampler (as decoding does)."""
    if from_rate <= 0 or to_rate <= 0:
        raise InvalidArgument(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    mono = samples.ndim == 1
    planar = np.ascontiguousarray(samples[None] if mono else samples, dtype=np.float32)
    if from_rate == to_rate:
        return planar[0] if mono else planar
    layout = _layout(planar.shape[0])
    frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
    frame.sample_rate = from_rate
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=to_rate)
    parts = [f.to_ndarray() for f in resampler.resample(frame)]
    parts += [f.to_ndarray() for f in resampler.resample(None)]
    out = np.concatenate(parts, axis=1) if parts else np.zeros((planar.shape[0], 0), np.float32)
    out = np.ascontiguousarray(out, dtype=np.float32)
    return out[0] if mono else out
