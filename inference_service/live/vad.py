"""Streaming Silero VAD: one ONNX session shared by every live stream, recurrent state per stream.

The cached ``SileroVadEngine`` serialises its calls because its wrapper keeps the model's
recurrent state inside; a live stream needs that state across calls, for as long as the
stream lasts, next to other streams. The ONNX graph takes the state as an input and
returns the next one, so one session (thread-safe in ONNX Runtime) serves all streams and
each ``SpeechDetector`` holds its own 2x1x128 state and 64-sample context.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray

CHUNK = 512  # samples per Silero step at 16 kHz (32 ms)
CONTEXT = 64
CHUNK_SECONDS = CHUNK / WHISPER_SAMPLE_RATE


class VadSessions:
    """ONNX Runtime sessions by model file, created on first use (one per file)."""

    def __init__(self) -> None:
        self._sessions: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def session(self, path: Path) -> Any:
        with self._lock:
            session = self._sessions.get(path)
            if session is None:
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.inter_op_num_threads = 1
                options.intra_op_num_threads = 1
                session = onnxruntime.InferenceSession(
                    str(path), sess_options=options, providers=["CPUExecutionProvider"]
                )
                self._sessions[path] = session
            return session

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()


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
