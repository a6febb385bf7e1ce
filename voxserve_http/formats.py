"""Encodings of the gateway's answers: protobuf messages as JSON objects, OpenAI's
transcription formats (json, text, srt, vtt, verbose_json) and server-sent events."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from voxctl.formats import SrtWriter, TranscriptWriter, VttWriter
from voxserve.inference.v1 import inference_pb2 as ipb

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "diarized_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}
SSE_MEDIA_TYPE = "text/event-stream"
NDJSON_MEDIA_TYPE = "application/x-ndjson"


def message_to_json(message: Message) -> dict[str, Any]:
    """A message as a JSON object with every field, proto field names, enums by name,
    timestamps as RFC 3339 (null when unset) and 64-bit integers as numbers (protobuf's own
    JSON mapping writes them as strings, which REST clients do not expect)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        descriptor = cast(FieldDescriptor, fd)
        value = getattr(message, descriptor.name)
        if descriptor.is_repeated:
            out[descriptor.name] = [_field_value(descriptor, item) for item in value]
        elif descriptor.message_type is not None and not message.HasField(descriptor.name):
            out[descriptor.name] = None
        else:
            out[descriptor.name] = _field_value(descriptor, value)
    return out


def _field_value(fd: FieldDescriptor, value: Any) -> Any:
    if fd.message_type is not None:
        if fd.message_type.full_name == Timestamp.DESCRIPTOR.full_name:
            return timestamp_text(value)
        return message_to_json(value)
    if fd.enum_type is not None:
        number = int(value)
        known = fd.enum_type.values_by_number.get(number)
        return known.name if known is not None else number
    if isinstance(value, bytes):
        return value.hex()
    return value


def timestamp_text(stamp: Timestamp) -> str | None:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return str(stamp.ToDatetime().isoformat(timespec="milliseconds")) + "Z"


def sse(data: Any, *, event: str | None = None, event_id: int | None = None) -> bytes:
    """One server-sent event; ``id:`` is what a client sends back as Last-Event-ID."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def ndjson(data: Any) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


@dataclass
class Transcript:
    """What a Transcribe stream said, gathered event by event.

    The text is the segments' texts joined by one space, as the inference service's
    ``Completed.text`` is; ``delta()`` gives each segment's share of it, so the deltas of
    a stream add up to exactly the final text.
    """

    task: str
    info: ipb.Info | None = None
    segments: list[ipb.Segment] = field(default_factory=list)
    completed: ipb.Completed | None = None
    text: str = ""
    job_id: str = ""

    def add(self, event: ipb.TranscribeEvent) -> str | None:
        """Take one event; the text delta it adds (None for events that add none)."""
        self.job_id = self.job_id or event.job_id
        kind = event.WhichOneof("event")
        if kind == "info":
            self.info = event.info
        elif kind == "completed":
            self.completed = event.completed
        elif kind == "segment":
            self.segments.append(event.segment)
            piece = event.segment.text.strip()
            if piece:
                delta = piece if not self.text else " " + piece
                self.text += delta
                return delta
        return None

    @property
    def duration(self) -> float:
        if self.completed is not None and self.completed.audio_seconds:
            return float(self.completed.audio_seconds)
        return float(self.info.duration) if self.info is not None else 0.0

    def usage(self) -> dict[str, Any]:
        """OpenAI's usage figure for Whisper: seconds of audio."""
        return {"type": "duration", "seconds": round(self.duration, 3)}

    def render(self, response_format: str, granularities: frozenset[str]) -> str | dict[str, Any]:
        if response_format == "json":
            return {"text": self.text, "usage": self.usage()}
        if response_format == "text":
            return self.text + "\n"
        if response_format in ("srt", "vtt"):
            out = io.StringIO()
            writer: TranscriptWriter = SrtWriter(out) if response_format == "srt" else VttWriter(out)
            for segment in self.segments:
                writer.segment(segment)
            writer.finish()
            return out.getvalue()
        if response_format == "diarized_json":
            return self.diarized()
        return self.verbose(granularities)

    def diarized(self) -> dict[str, Any]:
        """OpenAI's diarized_json (TranscriptionDiarized): segments with their speaker."""
        return {
            "task": self.task,
            "duration": round(self.duration, 3),
            "text": self.text,
            "segments": [
                {
                    "type": "transcript.text.segment",
                    "id": f"seg_{index:03d}",
                    "start": round(segment.start, 3),
                    "end": round(segment.end, 3),
                    "text": segment.text.strip(),
                    "speaker": segment.speaker,
                }
                for index, segment in enumerate(self.segments)
            ],
            "usage": self.usage(),
        }

    def verbose(self, granularities: frozenset[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "task": self.task,
            "language": self.info.language if self.info is not None else "",
            "duration": round(self.duration, 3),
            "text": self.text,
        }
        if "segment" in granularities:
            body["segments"] = [
                {
                    "id": index,
                    "start": round(segment.start, 3),
                    "end": round(segment.end, 3),
                    "text": segment.text,
                    "avg_logprob": segment.avg_logprob,
                    "no_speech_prob": segment.no_speech_prob,
                    **({"speaker": segment.speaker} if segment.speaker else {}),
                }
                for index, segment in enumerate(self.segments)
            ]
        if "word" in granularities:
            body["words"] = [
                {
                    "word": word.word.strip(),
                    "start": round(word.start, 3),
                    "end": round(word.end, 3),
                    **({"speaker": word.speaker} if word.speaker else {}),
                }
                for segment in self.segments
                for word in segment.words
            ]
        body["usage"] = self.usage()
        return body
