"""The payloads a file transcription job and a live stream both send: Accepted first, Completed last."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accepted:
    queue_position: int  # jobs ahead of this one (0 for a live stream: it never queues)
    model_id: str


@dataclass(frozen=True)
class Completed:
    audio_seconds: float
    processing_seconds: float
    real_time_factor: float
    model_load_seconds: float
    cache_hit: bool
    segments: int
    text: str
    speakers: int = 0  # with diarization: how many speakers were found
