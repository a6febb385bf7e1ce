"""Streaming Silero VAD: one ONNX session shared by every caller, recurrent state per stream.

The cached ``SileroVadEngine`` serialises its calls because its wrapper keeps the model's
recurrent state inside; a live stream (or a file's search for its first utterance) needs
that state across calls, for as long as the stream lasts, next to other streams. The ONNX graph takes the state as an input and
returns the next one, so one session (thread-safe in ONNX Runtime) serves all streams and
each ``SpeechDetector`` holds its own 2x1x128 state and 64-sample context.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray
from inference_service.model_cache.reservations import Reservation

# One ONNX Runtime session of silero_vad.onnx, measured (RSS of 10 sessions / 10): 10.2 MiB.
VAD_SESSION_BYTES = 11 << 20

CHUNK = 512  # samples per Silero step at 16 kHz (32 ms)
CONTEXT = 64
CHUNK_SECONDS = CHUNK / WHISPER_SAMPLE_RATE


class VadSessions:
    """ONNX Runtime sessions by model file, created on first use (one per file).

    ``reserve`` (the model cache's) counts each session's memory in the cache's budget for
    as long as the session is kept: it is not a cached model, yet it takes ~10 MiB.
    """

    def __init__(self, reserve: Callable[[int, str], Reservation] | None = None) -> None:
        self._sessions: dict[Path, Any] = {}
        self._reservations: list[Reservation] = []
        self._reserve = reserve
        self._lock = threading.Lock()

    def session(self, path: Path) -> Any:
        """The session of ``path``; creating it may evict idle models (call it off the event
        loop) or raise CacheFull when the cache has no room for it."""
        with self._lock:
            session = self._sessions.get(path)
            if session is None:
                reservation = (
                    self._reserve(VAD_SESSION_BYTES, f"the live VAD session of {path.name}") if self._reserve else None
                )
                try:
                    session = _new_session(path)
                except BaseException:
                    if reservation is not None:
                        reservation.release()
                    raise
                if reservation is not None:
                    self._reservations.append(reservation)
                self._sessions[path] = session
            return session

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()
            reservations, self._reservations = self._reservations, []
        for reservation in reservations:
            reservation.release()


def _new_session(path: Path) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class VadThresholds:
    """Silero's own defaults: speech above 0.5, silence below 0.35 (hysteresis)."""

    speech: float = 0.5
    silence: float = 0.35


class SpeechDetector:
    """Speech probability per 32 ms of one stream, fed with chunks of any length."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros((1, CONTEXT), np.float32)
        self._pending = np.zeros(0, np.float32)
        self._sr = np.array(WHISPER_SAMPLE_RATE, dtype=np.int64)

    def probabilities(self, samples: FloatArray) -> list[float]:
        """One probability per complete 512-sample step; a remainder waits for the next call."""
        data = np.concatenate([self._pending, samples]) if self._pending.size else samples
        steps = data.shape[0] // CHUNK
        self._pending = data[steps * CHUNK :].copy()
        out: list[float] = []
        for index in range(steps):
            chunk = data[index * CHUNK : (index + 1) * CHUNK].reshape(1, CHUNK)
            window = np.concatenate([self._context, chunk], axis=1).astype(np.float32, copy=False)
            prob, self._state = self._session.run(None, {"input": window, "state": self._state, "sr": self._sr})
            self._context = window[:, -CONTEXT:]
            out.append(float(prob[0][0]))
        return out
