"""What live transcription holds in memory besides the cached models, for the cache's budget.

Measured on this machine (tiny.en int8, silero_vad.onnx, RSS after a malloc trim, see
docs/performance.md "Live streams' memory"): one ONNX Runtime session of the VAD model
costs 10.2 MiB (10 sessions: +101 MiB); a stream's SpeechDetector on the shared session
3.5-6.9 KiB (N = 50, 200, 800 detectors fed 1 s of speech). A stream's audio is bounded
by the session (a segment is final by ``max_buffer`` seconds) plus the lag at which the
stream is abandoned, and a queued decode holds a copy of at most 30 s.
"""

from __future__ import annotations

from inference_service.audio import WHISPER_SAMPLE_RATE
from inference_service.engines.buffer_decoder import MAX_SECONDS
from inference_service.engines.speech_detector import VAD_SESSION_BYTES
from inference_service.live.session import LiveSettings

__all__ = ["VAD_SESSION_BYTES", "VAD_STATE_BYTES", "stream_bytes"]

VAD_STATE_BYTES = 16 << 10  # one stream's recurrent state, context and pending samples (measured <= 6.9 KiB)
FLOAT32 = 4


def stream_bytes(settings: LiveSettings, abandon_lag: float) -> int:
    """Upper bound of one live stream's own memory: VAD state, its audio buffer, one decode's copy."""
    buffer_seconds = settings.max_buffer + abandon_lag + MAX_SECONDS
    return VAD_STATE_BYTES + int(buffer_seconds * WHISPER_SAMPLE_RATE * FLOAT32)
