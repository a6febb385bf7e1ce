"""Pure formatting: human sizes and durations, subtitle timestamps, transcript writers."""

from __future__ import annotations

import json
import math
from typing import Any, Protocol, TextIO

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(num_bytes: float) -> str:
    """Binary units with one decimal: ``0 B``, ``512 B``, ``1.5 KiB``, ``75.5 MiB``."""
    if num_bytes < 0 or math.isnan(num_bytes):
        return "?"
    if num_bytes < 1024:
        return f"{int(num_bytes)} B"
    value = float(num_bytes)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float) -> str:
    return f"{human_size(bytes_per_second)}/s"


def human_duration(seconds: float) -> str:
    """``M:SS`` or ``H:MM:SS`` for ETAs and elapsed times; ``--:--`` when unknown."""
    if seconds < 0 or math.isnan(seconds) or math.isinf(seconds):
        return "--:--"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def relative_age(seconds: float) -> str:
    """How long ago, coarse: ``4s ago``, ``12m ago``, ``3h ago``, ``2d ago``."""
    if seconds < 0 or math.isnan(seconds):
        return "-"
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds // 86400)}d ago"


def _split(seconds: float, fraction_digits: int) -> tuple[int, int, int, int]:
    """Hours, minutes, seconds and the fraction, rounded once at the output precision so
    59.9999 becomes 1:00.00 rather than 0:60.00."""
    scale = 10**fraction_digits
    units = max(0, round(seconds * scale))
    whole, fraction = divmod(units, scale)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return hours, minutes, secs, fraction


def text_timestamp(seconds: float) -> str:
    """``MM:SS.cc`` (``HH:MM:SS.cc`` from one hour) as in ``[00:00.00 -> 00:03.20]``."""
    hours, minutes, secs, centis = _split(seconds, 2)
    if hours:
        return f"{hours:02d}:{minutes:02d}:{secs:02d}.{centis:02d}"
    return f"{minutes:02d}:{secs:02d}.{centis:02d}"


def srt_timestamp(seconds: float) -> str:
    """SubRip: ``HH:MM:SS,mmm``."""
    hours, minutes, secs, millis = _split(seconds, 3)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def vtt_timestamp(seconds: float) -> str:
    """WebVTT: ``HH:MM:SS.mmm``."""
    hours, minutes, secs, millis = _split(seconds, 3)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


class SegmentLike(Protocol):
    @property
    def start(self) -> float: ...
    @property
    def end(self) -> float: ...
    @property
    def text(self) -> str: ...


class TranscriptWriter:
    """Writes segments to ``out`` as they arrive, flushing each so a pipe sees it at once.

    Subclasses render one segment; ``event`` receives every event as a JSON-able dict
    (only the json format uses it) and ``finish`` closes the document.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    def segment(self, segment: SegmentLike) -> None:
        rendered = self.render(segment, self.count + 1)
        if rendered:
            self.count += 1
            self.out.write(rendered)
            self.out.flush()

    def event(self, event: dict[str, Any]) -> None:
        return None

    def finish(self) -> None:
        self.out.flush()

    def render(self, segment: SegmentLike, number: int) -> str:
        """The text for segment ``number`` (1-based); empty to skip it."""
        raise NotImplementedError


def speaker_of(segment: SegmentLike) -> str:
    """The segment's speaker label (diarized transcripts), else empty."""
    return str(getattr(segment, "speaker", "") or "")


class TextWriter(TranscriptWriter):
    def render(self, segment: SegmentLike, number: int) -> str:
        speaker = speaker_of(segment)
        prefix = f"[{speaker}] " if speaker else ""
        return f"[{text_timestamp(segment.start)} -> {text_timestamp(segment.end)}] {prefix}{segment.text.strip()}\n"


class SrtWriter(TranscriptWriter):
    def render(self, segment: SegmentLike, number: int) -> str:
        text = _cue_text(segment.text)
        if not text:
            return ""
        speaker = speaker_of(segment)
        text = f"[{speaker}] {text}" if speaker else text
        return f"{number}\n{srt_timestamp(segment.start)} --> {srt_timestamp(segment.end)}\n{text}\n\n"


class VttWriter(TranscriptWriter):
    """WebVTT; the header is written with the first cue (or at finish for an empty file)
    so a call that fails at once leaves stdout empty."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(out)
        self.header_written = False

    def render(self, segment: SegmentLike, number: int) -> str:
        text = _cue_text(segment.text)
        if not text:
            return ""
        speaker = speaker_of(segment)
        if speaker:  # WebVTT's voice span names who speaks the cue
            text = f"<v {_vtt_voice(speaker)}>{text}"
        header = "" if self.header_written else "WEBVTT\n\n"
        self.header_written = True
        return f"{header}{vtt_timestamp(segment.start)} --> {vtt_timestamp(segment.end)}\n{text}\n\n"

    def finish(self) -> None:
        if not self.header_written:
            self.out.write("WEBVTT\n\n")
            self.header_written = True
        super().finish()


class JsonLinesWriter(TranscriptWriter):
    """One JSON object per event line (segments included, in event order)."""

    def segment(self, segment: SegmentLike) -> None:
        self.count += 1  # written by event(), which sees every event

    def event(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, ensure_ascii=False) + "\n")
        self.out.flush()


def _vtt_voice(name: str) -> str:
    # A voice annotation ends at ">", and "&" / "<" start escapes and tags.
    return name.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cue_text(text: str) -> str:
    # A blank line ends a cue in both SRT and VTT, so it must not appear inside one.
    lines = (line.strip() for line in text.strip().splitlines())
    return "\n".join(line for line in lines if line)


WRITERS: dict[str, type[TranscriptWriter]] = {
    "text": TextWriter,
    "srt": SrtWriter,
    "vtt": VttWriter,
    "json": JsonLinesWriter,
}
