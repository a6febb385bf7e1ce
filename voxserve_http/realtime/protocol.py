"""OpenAI Realtime transcription events: the session's settings from the client's updates,
and the server's events in OpenAI's shapes.

Two dialects carry the same session: the beta one (``transcription_session.update``, flat
fields, the ``OpenAI-Beta: realtime=v1`` header) and the GA one (``session.update`` with
``{"type": "transcription", "audio": {"input": {...}}}``). Both map onto one SessionConfig.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voxserve_http import validation
from voxserve_http.errors import ApiError

OPENAI_RATE = 24000  # pcm16 as OpenAI's clients send it
MIN_RATE, MAX_RATE = 8000, 96000
BETA, GA = "beta", "ga"
Event = dict[str, Any]


class EventError(Exception):
    """A client event that cannot be applied: an ``error`` event; the connection stays open."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


@dataclass(frozen=True)
class TurnDetection:
    """server_vad's settings; they map onto the live engine's endpointing."""

    threshold: float = 0.5  # StreamingConfig.speech_threshold
    prefix_padding_ms: int = 300  # speech_pad_seconds
    silence_duration_ms: int = 500  # endpoint_silence_seconds


@dataclass(frozen=True)
class SessionConfig:
    model: str = ""  # as the client named it; "" or an alias = the inference service's default
    language: str = ""
    prompt: str = ""
    rate: int = OPENAI_RATE  # of the pcm16 the client appends
    turn_detection: TurnDetection | None = TurnDetection()  # None: the client commits

    @property
    def manual(self) -> bool:
        return self.turn_detection is None


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# --------------------------------------------------------------------------- client updates


def updated_config(config: SessionConfig, event: Mapping[str, Any]) -> tuple[SessionConfig, str]:
    """The config after a ``transcription_session.update`` (beta) or ``session.update`` (GA),
    and the dialect it spoke; EventError naming the field when something cannot apply (the
    whole update is then refused, as OpenAI does)."""
    session = _mapping(event.get("session", {}), "session")
    if event["type"] == "session.update":
        return _ga_update(config, session), GA
    changes: dict[str, Any] = {}
    if "input_audio_format" in session:
        changes["rate"] = _rate(session["input_audio_format"], "session.input_audio_format")
    if "input_audio_transcription" in session:
        changes.update(_transcription(session["input_audio_transcription"], "session.input_audio_transcription"))
    if "turn_detection" in session:
        changes["turn_detection"] = _turn_detection(session["turn_detection"], "session.turn_detection")
    return dataclasses.replace(config, **changes), BETA


def _ga_update(config: SessionConfig, session: Mapping[str, Any]) -> SessionConfig:
    kind = session.get("type", "transcription")
    if kind != "transcription":
        raise EventError(
            f"session.type {str(kind)[:32]!r} is not served here: this endpoint transcribes "
            "(?intent=transcription); send session.type 'transcription'",
            param="session.type",
        )
    audio = _mapping(session.get("audio", {}), "session.audio")
    given = _mapping(audio.get("input", {}), "session.audio.input")
    changes: dict[str, Any] = {}
    if "format" in given:
        changes["rate"] = _rate(given["format"], "session.audio.input.format")
    if "transcription" in given:
        changes.update(_transcription(given["transcription"], "session.audio.input.transcription"))
    if "turn_detection" in given:
        changes["turn_detection"] = _turn_detection(given["turn_detection"], "session.audio.input.turn_detection")
    return dataclasses.replace(config, **changes)


def _mapping(value: Any, param: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise EventError(f"{param} must be an object", param=param)
    return value


def _rate(value: Any, param: str) -> int:
    """``pcm16`` (24 kHz), or ``{"type": "audio/pcm", "rate": N}`` for another rate."""
    if value == "pcm16":
        return OPENAI_RATE
    if isinstance(value, Mapping) and value.get("type", "audio/pcm") == "audio/pcm":
        rate = value.get("rate", OPENAI_RATE)
        if isinstance(rate, int) and not isinstance(rate, bool) and MIN_RATE <= rate <= MAX_RATE:
            return rate
        raise EventError(f"{param}.rate must be a whole number of Hz, {MIN_RATE}-{MAX_RATE}", param=f"{param}.rate")
    raise EventError(
        f"{param} {str(value)[:40]!r} is not supported: send 'pcm16' (16-bit little-endian mono at 24 kHz) "
        "or {'type': 'audio/pcm', 'rate': N}",
        code="unsupported_audio_format",
        param=param,
    )


def _transcription(value: Any, param: str) -> dict[str, Any]:
    if value is None:  # OpenAI: no transcription; here transcribing is the point
        return {"model": "", "language": "", "prompt": ""}
    given = _mapping(value, param)
    fields: dict[str, str] = {}
    for name in ("model", "language", "prompt"):
        text = given.get(name) or ""
        if not isinstance(text, str):
            raise EventError(f"{param}.{name} must be a string", param=f"{param}.{name}")
        fields[name] = text
    try:
        model = fields["model"].strip()
        if model:
            validation.model_id(model, param="model")
        return {
            "model": model,
            "language": validation.language(fields["language"]),
            "prompt": validation.prompt(fields["prompt"]),
        }
    except ApiError as error:
        raise EventError(error.message, code=error.code or "invalid_value", param=f"{param}.{error.param}") from None


def _turn_detection(value: Any, param: str) -> TurnDetection | None:
    if value is None:
        return None
    given = _mapping(value, param)
    kind = given.get("type", "server_vad")
    if kind != "server_vad":
        raise EventError(
            f"{param}.type {str(kind)[:32]!r} is not supported: use 'server_vad', or null to commit the "
            "buffer yourself",
            param=f"{param}.type",
        )
    default = TurnDetection()
    threshold = _number(given, "threshold", default.threshold, (0.05, 0.95), param)
    padding = _number(given, "prefix_padding_ms", default.prefix_padding_ms, (0, 2000), param)
    silence = _number(given, "silence_duration_ms", default.silence_duration_ms, (100, 10000), param)
    return TurnDetection(float(threshold), int(padding), int(silence))


def _number(given: Mapping[str, Any], name: str, default: float, bounds: tuple[float, float], param: str) -> float:
    value = given.get(name)
    if value is None:
        return default
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise EventError(f"{param}.{name} must be a number from {low:g} to {high:g}", param=f"{param}.{name}")
    return float(value)


# --------------------------------------------------------------------------- server events


def server_event(kind: str, **fields: Any) -> Event:
    return {"event_id": new_id("event"), "type": kind, **fields}


def session_object(session_id: str, config: SessionConfig, dialect: str) -> dict[str, Any]:
    """The session as ``*.created`` / ``*.updated`` show it: what is in force."""
    transcription = {"model": config.model or "whisper-1", "language": config.language, "prompt": config.prompt}
    turn = (
        None if config.turn_detection is None else {"type": "server_vad", **dataclasses.asdict(config.turn_detection)}
    )
    if dialect == GA:
        audio_format = {"type": "audio/pcm", "rate": config.rate}
        audio_input = {"format": audio_format, "transcription": transcription, "turn_detection": turn}
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "audio": {"input": {**audio_input, "noise_reduction": None}},
            "include": [],
        }
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "input_audio_format": "pcm16" if config.rate == OPENAI_RATE else {"type": "audio/pcm", "rate": config.rate},
        "input_audio_transcription": transcription,
        "turn_detection": turn,
        "input_audio_noise_reduction": None,
        "include": [],
        "modalities": ["text"],
    }


def session_event(kind: str, session_id: str, config: SessionConfig, dialect: str) -> Event:
    """``created`` or ``updated``: ``transcription_session.*`` (beta) or ``session.*`` (GA)."""
    prefix = "session" if dialect == GA else "transcription_session"
    return server_event(f"{prefix}.{kind}", session=session_object(session_id, config, dialect))


def error_body(message: str, code: str | None, param: str | None = None, kind: str = "invalid_request_error") -> Event:
    return {"type": kind, "code": code, "message": message, "param": param}


def error_event(
    message: str,
    code: str | None,
    param: str | None = None,
    client_event_id: str | None = None,
    kind: str = "invalid_request_error",
) -> Event:
    """OpenAI's ``error`` event: ``{"type": "error", "error": {type, code, message, param, event_id}}``."""
    return server_event("error", error={**error_body(message, code, param, kind), "event_id": client_event_id})


def api_error_event(error: ApiError) -> Event:
    return error_event(error.message, error.code, error.param, kind=error.type)
