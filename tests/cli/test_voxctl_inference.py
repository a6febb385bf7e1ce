"""voxctl transcribe / ps / load / unload / jobs against the real inference service."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import DATA_DIR, InferenceHandle
from voxctl.__main__ import main

VOXCTL = Path(sys.executable).parent / "voxctl"
SHORT = DATA_DIR / "speech_short.wav"


def run(capsys: pytest.CaptureFixture[str], handle: InferenceHandle, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--store", handle.store.address, "--inference", handle.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_transcribe_text_prints_segments_and_summary(capsys, inference: InferenceHandle) -> None:
    code, out, err = run(capsys, inference, "transcribe", str(SHORT))
    assert code == 0, err
    assert re.search(r"\[00:00\.\d\d -> 00:0\d\.\d\d\] .*report", out, re.IGNORECASE), out
    assert "RTF" in err and "cache miss" in err


def test_transcribe_srt_and_json_with_words(capsys, inference: InferenceHandle) -> None:
    code, out, _ = run(capsys, inference, "transcribe", str(SHORT), "--format", "srt")
    assert code == 0
    assert out.startswith("1\n00:00:00,000 --> 00:00:0")
    code, out, _ = run(capsys, inference, "transcribe", str(SHORT), "--format", "json", "--words")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    segments = [e for e in events if "segment" in e]
    assert segments and segments[0]["segment"]["words"]


def test_transcribe_bad_file_and_unknown_model_exit_1(capsys, inference: InferenceHandle, tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio" * 100)
    code, _, err = run(capsys, inference, "transcribe", str(junk))
    assert code == 1 and "INVALID_ARGUMENT" in err
    code, _, err = run(capsys, inference, "transcribe", str(SHORT), "--model", "no-such-model")
    assert code == 1 and "NOT_FOUND" in err


def test_load_ps_unload(capsys, inference: InferenceHandle) -> None:
    code, _, err = run(capsys, inference, "load", "whisper-tiny.en", "--pin")
    assert code == 0, err
    code, out, _ = run(capsys, inference, "ps")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("whisper-tiny.en"))
    assert "whisper" in row and "cpu" in row and "int8" in row and "yes" in row
    code, _, _ = run(capsys, inference, "unload", "whisper-tiny.en")
    assert code == 0
    code, out, _ = run(capsys, inference, "--json", "ps")
    assert "whisper-tiny.en" not in out


def test_jobs_watch_replays_a_finished_job(capsys, inference: InferenceHandle) -> None:
    code, _, err = run(capsys, inference, "transcribe", str(SHORT), "--job-id", "cli-job-1")
    assert code == 0, err
    code, out, _ = run(capsys, inference, "jobs", "watch", "cli-job-1")
    assert code == 0 and "report" in out.lower()


def test_console_script_transcribes(inference: InferenceHandle) -> None:
    result = subprocess.run(
        [str(VOXCTL), "--inference", inference.address, "transcribe", str(SHORT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "office" in result.stdout.lower()


def test_transcribe_diarized_text_and_vtt(capsys, inference: InferenceHandle) -> None:
    conversation = str(DATA_DIR / "conversation.ogg")
    code, out, err = run(capsys, inference, "transcribe", conversation, "--speakers", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines and all(
        re.match(r"\[\d\d:\d\d\.\d\d -> \d\d:\d\d\.\d\d\] \[SPEAKER_0[0-2]\] ", line) for line in lines
    ), out
    assert {line.split("] [")[1].split("]")[0] for line in lines} == {"SPEAKER_00", "SPEAKER_01", "SPEAKER_02"}
    assert "3 speakers" in err
    jfk = f"Kennedy={DATA_DIR / 'known_jfk.ogg'}"
    code, out, err = run(capsys, inference, "transcribe", conversation, "--known-speaker", jfk, "--format", "vtt")
    assert code == 0, err
    assert out.startswith("WEBVTT\n\n") and "<v Kennedy>" in out and "<v SPEAKER_0" in out, out
    code, _, err = run(capsys, inference, "transcribe", conversation, "--known-speaker", "Kennedy")
    assert code == 2 and "NAME=FILE" in err
