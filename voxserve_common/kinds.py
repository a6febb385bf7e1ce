"""The kinds of model both services handle; the values are the strings of catalogs, logs and flags."""

from __future__ import annotations

from enum import StrEnum


class ModelKind(StrEnum):
    """What a model is for; each kind has one engine in the inference service.

    A StrEnum so that ``ModelKind.WHISPER == "whisper"``: YAML catalogs (``kind: whisper``),
    log records and maps keyed by the old strings keep working unchanged.
    """

    WHISPER = "whisper"
    VAD = "vad"
    DEMUCS = "demucs"
    DIARIZATION = "diarization"

    @classmethod
    def parse(cls, value: str) -> ModelKind | None:
        """The kind named by ``value``, or None when no kind has that name."""
        try:
            return cls(value)
        except ValueError:
            return None
