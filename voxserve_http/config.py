"""Typed configuration of the HTTP gateway (flags, VOXSERVE_* env vars, YAML file).

The shared settings (logs, TLS of its own port, insecure) come from ServiceSettings like
the two gRPC services'; the gateway adds its backends, their TLS and the backend token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from voxserve_common.config import ConfigError, ServiceSettings, check_settings


@dataclass(frozen=True)
class GatewayConfig(ServiceSettings):
    port: int = 8080
    metrics_port: int = 9103  # -1 disables the /metrics endpoint
    inference: str = "127.0.0.1:50052"  # address of the inference service
    model_store: str = "127.0.0.1:50051"  # address of the model store
    # The channels to the backends: TLS (a CA; with a client certificate and key, mutual
    # TLS), plaintext without them.
    store_tls_ca: Path | None = None
    store_tls_cert: Path | None = None
    store_tls_key: Path | None = None
    inference_tls_ca: Path | None = None
    inference_tls_cert: Path | None = None
    inference_tls_key: Path | None = None
    # A file holding the token the gateway sends when the HTTP caller sent no
    # Authorization header (anonymous callers get its roles: give it read/transcribe, not
    # admin). None: a caller's Bearer token is forwarded, a call without one reaches the
    # backends unauthenticated.
    backend_token_file: Path | None = None
    # Request bodies above this get 413 before anything reaches the inference service.
    # Keep it at or below the inference service's max_audio_bytes (200 MiB by default).
    max_upload_bytes: int = 200 * 1024 * 1024
    # Seconds a client has to send its whole request body, counted from its headers; a body
    # still arriving then gets 408 and its connection is closed, so slow or stalled uploads
    # cannot hold the gateway's connections. 300 s is 0.7 MB/s for a 200 MiB upload: raise it
    # with max_upload_bytes, or for clients on slow links.
    upload_timeout_seconds: float = 300.0
    # Model names OpenAI clients send that mean "the inference service's default model".
    default_model_aliases: tuple[str, ...] = ("whisper-1",)
    # Deadline of the unary calls (list, get, delete, cancel); transcriptions and pulls
    # have their own, since they run as long as the audio or the download takes.
    request_timeout_seconds: float = 30.0
    transcribe_timeout_seconds: float = 3600.0
    pull_timeout_seconds: float = 3600.0
    # The Retry-After header of a 429 (RESOURCE_EXHAUSTED) or 503 (backend down).
    retry_after_seconds: int = 5
    # Open /api/events and /api/jobs/{id}/events streams at once; beyond it 429.
    max_event_streams: int = 512
    # Seconds between SSE comment lines on a quiet stream, so proxies keep it open.
    sse_keepalive_seconds: float = 15.0
    # The OpenAI Realtime WebSocket (/v1/realtime?intent=transcription). Sessions open at once
    # (each holds one live stream of the inference service while audio flows, which has its
    # own live_max_streams); beyond it a new session gets an `error` event and is closed.
    realtime_max_sessions: int = 64
    # A client event larger than this gets an `error` event and is dropped (the connection
    # stays open); one over twice this closes the connection (1009). 1 MiB of JSON is about
    # 16 s of 24 kHz pcm16 in base64; OpenAI's clients send 20-100 ms per event.
    realtime_max_message_bytes: int = 1 << 20
    # A session whose client sent no event for this long gets an `error` event and is closed.
    realtime_idle_seconds: float = 60.0

    def validate(self) -> None:
        checks = [
            *self.common_checks(),
            (bool(self.inference.strip()), "inference", "must be an address HOST:PORT"),
            (bool(self.model_store.strip()), "model_store", "must be an address HOST:PORT"),
            (self.max_upload_bytes > 0, "max_upload_bytes", "must be > 0"),
            (self.upload_timeout_seconds > 0, "upload_timeout_seconds", "must be > 0"),
            (self.request_timeout_seconds > 0, "request_timeout_seconds", "must be > 0"),
            (self.transcribe_timeout_seconds > 0, "transcribe_timeout_seconds", "must be > 0"),
            (self.pull_timeout_seconds > 0, "pull_timeout_seconds", "must be > 0"),
            (self.retry_after_seconds >= 0, "retry_after_seconds", "must be >= 0"),
            (self.max_event_streams >= 1, "max_event_streams", "must be >= 1"),
            (self.sse_keepalive_seconds > 0, "sse_keepalive_seconds", "must be > 0"),
            (self.realtime_max_sessions >= 1, "realtime_max_sessions", "must be >= 1"),
            (self.realtime_max_message_bytes >= 4096, "realtime_max_message_bytes", "must be >= 4096"),
            (self.realtime_idle_seconds > 0, "realtime_idle_seconds", "must be > 0"),
            (
                self.auth_tokens is None,
                "auth_tokens",
                "the gateway checks no tokens itself: set auth_tokens on the model store and the inference "
                "service; the gateway forwards the caller's Authorization (backend_token_file for callers "
                "without one)",
            ),
        ]
        check_settings(self, checks)
        if any(not alias.strip() for alias in self.default_model_aliases):
            raise ConfigError("invalid setting default_model_aliases: an alias must not be empty")
