"""voxctl's pure formatting: timestamps, sizes, transcript writers, tables, status line."""

from __future__ import annotations

import io
import json

import pytest

from voxctl.formats import (
    SrtWriter,
    TextWriter,
    VttWriter,
    human_duration,
    human_size,
    relative_age,
    srt_timestamp,
    text_timestamp,
    vtt_timestamp,
)
from voxctl.output import message_to_dict, render_table
from voxctl.progress import StatusLine, bar
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as mpb


@pytest.mark.parametrize(
    ("seconds", "text", "srt", "vtt"),
    [
        (0, "00:00.00", "00:00:00,000", "00:00:00.000"),
        (3.2, "00:03.20", "00:00:03,200", "00:00:03.200"),
        (61.005, "01:01.00", "00:01:01,005", "00:01:01.005"),
        (59.9996, "01:00.00", "00:01:00,000", "00:01:00.000"),  # rounds up without "0:60"
        (3723.4567, "01:02:03.46", "01:02:03,457", "01:02:03.457"),
        (-0.5, "00:00.00", "00:00:00,000", "00:00:00.000"),
    ],
)
def test_timestamps(seconds: float, text: str, srt: str, vtt: str) -> None:
    assert text_timestamp(seconds) == text
    assert srt_timestamp(seconds) == srt
    assert vtt_timestamp(seconds) == vtt


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2 * 1024 * 1024, "2.0 MiB"),
        (75_538_000, "72.0 MiB"),
        (3 * 1024**3 + 512 * 1024**2, "3.5 GiB"),
        (5 * 1024**5, "5.0 PiB"),
        (2000 * 1024**5, "2000.0 PiB"),
    ],
)
def test_human_size(num_bytes: int, expected: str) -> None:
    assert human_size(num_bytes) == expected


def test_durations_and_ages() -> None:
    assert human_duration(4.4) == "0:04"
    assert human_duration(125) == "2:05"
    assert human_duration(3725) == "1:02:05"
    assert human_duration(-1) == "--:--"
    assert human_duration(float("inf")) == "--:--"
    assert relative_age(5.9) == "5s ago"
    assert relative_age(150) == "2m ago"
    assert relative_age(7300) == "2h ago"
    assert relative_age(3 * 86400 + 5) == "3d ago"


def _segments() -> list[ipb.Segment]:
    return [
        ipb.Segment(index=0, start=0.0, end=3.2, text=" Hello there."),
        ipb.Segment(index=1, start=3.2, end=5.0, text=" "),  # empty: no cue
        ipb.Segment(index=2, start=5.0, end=3661.25, text=" Second line\n\nwith a gap."),
    ]


def test_text_writer_prints_each_segment_with_times() -> None:
    out = io.StringIO()
    writer = TextWriter(out)
    for segment in _segments():
        writer.segment(segment)
    writer.finish()
    assert out.getvalue().splitlines()[0] == "[00:00.00 -> 00:03.20] Hello there."
    assert out.getvalue().splitlines()[-1] == "with a gap."
    assert "[00:05.00 -> 01:01:01.25] Second line" in out.getvalue()


def test_srt_numbers_cues_from_one_and_skips_empty_ones() -> None:
    out = io.StringIO()
    writer = SrtWriter(out)
    for segment in _segments():
        writer.segment(segment)
    writer.finish()
    assert out.getvalue() == (
        "1\n00:00:00,000 --> 00:00:03,200\nHello there.\n\n"
        "2\n00:00:05,000 --> 01:01:01,250\nSecond line\nwith a gap.\n\n"
    )


def test_vtt_has_header_once_and_dotted_times() -> None:
    out = io.StringIO()
    writer = VttWriter(out)
    for segment in _segments():
        writer.segment(segment)
    writer.finish()
    text = out.getvalue()
    assert text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:03.200\nHello there.\n\n")
    assert text.count("WEBVTT") == 1
    assert "00:00:05.000 --> 01:01:01.250\nSecond line\nwith a gap.\n\n" in text


def test_writers_name_the_speaker_of_diarized_segments() -> None:
    segments = [
        ipb.Segment(start=0.0, end=1.5, text=" Hello.", speaker="SPEAKER_00"),
        ipb.Segment(start=1.5, end=3.0, text=" Hi, <you>.", speaker="Ana <& Bo>"),
    ]
    rendered = {}
    for name, writer_class in (("text", TextWriter), ("srt", SrtWriter), ("vtt", VttWriter)):
        out = io.StringIO()
        writer = writer_class(out)
        for segment in segments:
            writer.segment(segment)
        writer.finish()
        rendered[name] = out.getvalue()
    assert rendered["text"].splitlines() == [
        "[00:00.00 -> 00:01.50] [SPEAKER_00] Hello.",
        "[00:01.50 -> 00:03.00] [Ana <& Bo>] Hi, <you>.",
    ]
    assert "1\n00:00:00,000 --> 00:00:01,500\n[SPEAKER_00] Hello.\n\n" in rendered["srt"]
    assert "00:00:00.000 --> 00:00:01.500\n<v SPEAKER_00>Hello.\n\n" in rendered["vtt"]
    assert "<v Ana &lt;&amp; Bo&gt;>Hi, <you>." in rendered["vtt"]


def test_empty_vtt_is_still_a_valid_file() -> None:
    out = io.StringIO()
    VttWriter(out).finish()
    assert out.getvalue() == "WEBVTT\n\n"


def test_message_to_dict_uses_names_numbers_and_only_the_set_oneof() -> None:
    event = ipb.TranscribeEvent(job_id="j1", sequence=7, segment=ipb.Segment(index=2, start=1.5, text="hi"))
    data = message_to_dict(event)
    assert data["job_id"] == "j1" and data["sequence"] == 7
    assert data["segment"]["text"] == "hi" and data["segment"]["words"] == []
    assert "progress" not in data and "completed" not in data and "timestamp" not in data
    model = mpb.Model(model_id="m", kind=mpb.WHISPER, state=mpb.READY, size_bytes=1 << 40)
    model_data = message_to_dict(model)
    assert model_data["kind"] == "WHISPER" and model_data["state"] == "READY"
    assert model_data["size_bytes"] == 1 << 40  # a number, not the proto3 JSON string
    json.dumps(model_data)


def test_render_table_aligns_columns() -> None:
    table = render_table(["MODEL", "SIZE"], [["a", "1.0 KiB"], ["longer-name", "2 B"]], right=["SIZE"])
    lines = table.splitlines()
    assert lines == ["MODEL           SIZE", "a            1.0 KiB", "longer-name      2 B"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_status_line_off_a_tty_prints_on_change_and_every_interval() -> None:
    out = io.StringIO()
    clock = FakeClock()
    status = StatusLine(out, tty=False, interval=2.0, clock=clock)
    status.update("WAITING", key="WAITING")
    clock.now = 0.5
    status.update("DOWNLOADING 1%", key="DOWNLOADING")  # state change: printed
    clock.now = 1.0
    status.update("DOWNLOADING 2%", key="DOWNLOADING")  # throttled
    clock.now = 2.6
    status.update("DOWNLOADING 3%", key="DOWNLOADING")  # interval passed
    clock.now = 2.7
    status.update("DOWNLOADING 4%", key="DOWNLOADING")  # throttled, but shown at done()
    status.done()
    assert out.getvalue().splitlines() == ["WAITING", "DOWNLOADING 1%", "DOWNLOADING 3%", "DOWNLOADING 4%"]
    assert "\r" not in out.getvalue()


def test_status_line_on_a_tty_redraws_in_place() -> None:
    out = io.StringIO()
    clock = FakeClock()
    status = StatusLine(out, tty=True, clock=clock)
    status.update("one", key=1)
    clock.now = 1.0
    status.update("two", key=1)
    status.note("a kept line")
    status.done()
    text = out.getvalue()
    assert text.count("\n") == 2  # the note and the final newline
    assert "\r\x1b[Kone" in text and "\r\x1b[Ktwo" in text
    assert text.endswith("\r\x1b[Ka kept line\n\r\x1b[Ktwo\n")


def test_bar_clamps() -> None:
    assert bar(0.5, width=4) == "[##..]"
    assert bar(2.0, width=4) == "[####]"
    assert bar(-1, width=4) == "[....]"
