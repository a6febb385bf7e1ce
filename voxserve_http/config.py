"""Typed configuration of the HTTP gateway (flags, VOXSERVE_* env vars, YAML file)."""

from __future__ import annotations

from dataclasses import dataclass

from voxserve_common.config import ConfigError, check_settings


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int = 9103  # -1 disables the /metrics endpoint
    inference: str = "127.0.0.1:50052"  # address of the inference service
    model_store: str = "127.0.0.1:50051"  # address of the model store
    # Request bodies above this get 413 before anything reaches the inference service.
    # Keep it at or below the inference service's max_audio_bytes (200 MiB by default).
    max_upload_bytes: int = 200 * 1024 * 1024
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
    grace_seconds: float = 20.0
    log_level: str = "INFO"
    log_format: str = "json"  # json | console | auto (console on a terminal)

    def validate(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port", "must be 0-65535"),
            (-1 <= self.metrics_port <= 65535, "metrics_port", "must be -1 (off) or 0-65535"),
            (bool(self.inference.strip()), "inference", "must be an address HOST:PORT"),
            (bool(self.model_store.strip()), "model_store", "must be an address HOST:PORT"),
            (self.max_upload_bytes > 0, "max_upload_bytes", "must be > 0"),
            (self.request_timeout_seconds > 0, "request_timeout_seconds", "must be > 0"),
            (self.transcribe_timeout_seconds > 0, "transcribe_timeout_seconds", "must be > 0"),
            (self.pull_timeout_seconds > 0, "pull_timeout_seconds", "must be > 0"),
            (self.retry_after_seconds >= 0, "retry_after_seconds", "must be >= 0"),
            (self.max_event_streams >= 1, "max_event_streams", "must be >= 1"),
            (self.sse_keepalive_seconds > 0, "sse_keepalive_seconds", "must be > 0"),
            (self.grace_seconds >= 0, "grace_seconds", "must be >= 0"),
            (self.log_format in ("auto", "json", "console"), "log_format", "must be auto, json or console"),
            (
                self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                "log_level",
                "must be DEBUG, INFO, WARNING, ERROR or CRITICAL",
            ),
        ]
        check_settings(self, checks)
        if any(not alias.strip() for alias in self.default_model_aliases):
            raise ConfigError("invalid setting default_model_aliases: an alias must not be empty")
