"""voxctl sends the routing key (x-voxserve-model) on every call about a model, and sends a transcription
again when the replica serving it was lost (a stream a proxy cut, then NOT_FOUND for its job).

Against a recording Inference server on loopback: what a proxy would see is the metadata."""

from __future__ import annotations

import pytest

from tests.recording_inference import Recorder, recorder
from tests.support import DATA_DIR
from voxctl.__main__ import main

__all__ = ["recorder"]  # the fixture

SHORT = DATA_DIR / "speech_short.wav"


def run(capsys: pytest.CaptureFixture[str], address: str, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--inference", address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_calls_about_a_model_carry_it_as_the_routing_header(
    capsys: pytest.CaptureFixture[str], recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    commands: list[tuple[str, ...]] = [
        ("transcribe", str(SHORT), "--model", "whisper-base"),
        ("load", "whisper-base"),
        ("unload", "whisper-base"),
        ("jobs", "cancel", "job-9", "--model", "whisper-base"),
        ("live", str(SHORT), "--model", "whisper-base", "--speed", "0"),
    ]
    for argv in commands:
        code, _, err = run(capsys, address, *argv)
        assert code == 0, (argv, err)
    assert servicer.calls == [
        ("Transcribe", ["whisper-base"]),
        ("LoadModel", ["whisper-base"]),
        ("UnloadModel", ["whisper-base"]),
        ("CancelJob", ["whisper-base"]),
        ("StreamingTranscribe", ["whisper-base"]),
    ]


def test_the_default_model_goes_without_the_header(
    capsys: pytest.CaptureFixture[str], recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    code, out, err = run(capsys, address, "transcribe", str(SHORT))
    assert code == 0, err
    assert servicer.calls == [("Transcribe", [])] and "hello there" in out


def test_a_transcription_whose_replica_was_lost_is_sent_again(
    capsys: pytest.CaptureFixture[str], recorder: tuple[Recorder, str]
) -> None:
    """The stream is cut after `accepted`; WatchJob (routed by the model, to the model's new
    replica) does not know the job: the request goes again, and its segment is printed once."""
    servicer, address = recorder
    servicer.cut_first_transcribe = True
    code, out, err = run(capsys, address, "transcribe", str(SHORT), "--model", "whisper-base")
    assert code == 0, err
    assert [method for method, _ in servicer.calls] == ["Transcribe", "WatchJob", "Transcribe"]
    assert all(values == ["whisper-base"] for _, values in servicer.calls)
    assert out.count("hello there") == 1
    assert "the job was lost with its replica" in err and "sending the request again" in err


def test_a_transcription_refused_before_it_started_is_sent_again_on_a_new_connection(
    capsys: pytest.CaptureFixture[str], recorder: tuple[Recorder, str]
) -> None:
    """A proxy's 503 (UNAVAILABLE before any event): the request goes again over a new
    connection (a resend on the old one once waited forever behind HAProxy; see
    ``Session.reconnect``)."""
    servicer, address = recorder
    servicer.refuse_first_transcribe = True
    code, out, err = run(capsys, address, "transcribe", str(SHORT), "--model", "whisper-base")
    assert code == 0, err
    assert [method for method, _ in servicer.calls] == ["Transcribe", "Transcribe"]
    assert servicer.peers[0] != servicer.peers[1], servicer.peers
    assert out.count("hello there") == 1
    assert "the call failed before the job started" in err and "sending the request again" in err


def test_a_resumed_job_is_watched_on_a_new_connection(
    capsys: pytest.CaptureFixture[str], recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    servicer.cut_first_transcribe = True
    code, _, err = run(capsys, address, "transcribe", str(SHORT), "--model", "whisper-base")
    assert code == 0, err
    assert len(set(servicer.peers)) == 3, servicer.peers  # Transcribe, WatchJob, Transcribe again
