"""Raw PCM from a live stream (s16le or f32le, any rate, interleaved channels) to 16 kHz mono float32."""

from __future__ import annotations

import enum

import av
import numpy as np

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray
from inference_service.errors import InvalidAudio
from voxserve_common.errors import InvalidArgument

MIN_RATE = 4000
MAX_RATE = 384_000
MAX_CHANNELS = 8


class Encoding(enum.StrEnum):
    LINEAR16 = "s16le"
    FLOAT32 = "f32le"


_DTYPES: dict[Encoding, np.dtype[np.int16] | np.dtype[np.float32]] = {
    Encoding.LINEAR16: np.dtype("<i2"),
    Encoding.FLOAT32: np.dtype("<f4"),
}


class PcmDecoder:
    """Turns byte chunks of any size into 16 kHz mono samples, keeping split frames and
    the resampler's state between chunks (so chunk boundaries leave no clicks or gaps)."""

    def __init__(self, encoding: Encoding, sample_rate: int, channels: int = 1) -> None:
        """Raises InvalidArgument for a rate outside 4-384 kHz or 0 / more than 8 channels."""
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise InvalidArgument(
                f"sample_rate_hertz must be {MIN_RATE}-{MAX_RATE} Hz, got {sample_rate}; "
                "send the rate the audio was captured at (16000 needs no resampling)"
            )
        if not 1 <= channels <= MAX_CHANNELS:
            raise InvalidArgument(f"channels must be 1-{MAX_CHANNELS} (0 means 1), got {channels}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.channels = channels
        self._dtype = _DTYPES[encoding]
        self._frame_bytes = self._dtype.itemsize * channels
        self._rest = b""
        self._resampler: av.AudioResampler | None = None
        if sample_rate != WHISPER_SAMPLE_RATE:
            self._resampler = av.AudioResampler(format="flt", layout="mono", rate=WHISPER_SAMPLE_RATE)
        self._pts = 0

    def decode(self, data: bytes) -> FloatArray:
        """The samples of ``data`` (plus any frame split off the previous chunk), at 16 kHz mono."""
        data = self._rest + data
        usable = len(data) - len(data) % self._frame_bytes
        self._rest = data[usable:]
        if usable == 0:
            return np.zeros(0, np.float32)
        samples = np.frombuffer(data[:usable], dtype=self._dtype)
        if self.encoding is Encoding.LINEAR16:
            mono = samples.astype(np.float32) / 32768.0
        else:
            mono = samples.astype(np.float32)
            if not np.all(np.isfinite(mono)):
                raise InvalidAudio("FLOAT32 audio holds NaN or infinite samples; send samples in -1..1")
        if self.channels > 1:
            mono = mono.reshape(-1, self.channels).mean(axis=1, dtype=np.float32)
        return self._resample(np.ascontiguousarray(mono, dtype=np.float32))

    def flush(self) -> FloatArray:
        """What the resampler still holds at the end of the stream."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._collect(self._resampler.resample(None))

    def _resample(self, mono: FloatArray) -> FloatArray:
        if self._resampler is None:
            return mono
        frame = av.AudioFrame.from_ndarray(mono.reshape(1, -1), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += mono.shape[0]
        return self._collect(self._resampler.resample(frame))

    @staticmethod
    def _collect(frames: list[av.AudioFrame]) -> FloatArray:
        if not frames:
            return np.zeros(0, np.float32)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32, copy=False)
