"""voxctl live: the request stream it sends and how it shows drafts and finals."""

from __future__ import annotations

import io
import json
from typing import Any

from tests.support import DATA_DIR, TRANSCRIPTS, word_error_rate
from voxctl.live import LiveView, live_requests, paced_chunks
from voxserve.inference.v1 import inference_pb2 as pb


def response(text: str, final: bool, result_id: str = "1") -> pb.StreamingTranscribeResponse:
    result = pb.StreamingResult(result_id=result_id, is_final=final, text=text, start=1.0, end=2.5)
    return pb.StreamingTranscribeResponse(sequence=1, result=result)


def test_requests_start_with_the_config_then_chunks_of_100_ms() -> None:
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000)
    audio = bytes(16000 * 2)  # 1 s of s16le
    messages = list(live_requests(config, audio, speed=0))
    assert messages[0].HasField("config") and messages[0].config == config
    assert [len(m.audio) for m in messages[1:]] == [3200] * 10


def test_stdin_is_read_in_chunks_until_it_ends() -> None:
    source = io.BytesIO(bytes(10_000))
    assert [len(c) for c in paced_chunks(source, 4096, 0.1, 0)] == [4096, 4096, 1808]


def test_on_a_terminal_the_draft_is_rewritten_in_place_and_finals_scroll() -> None:
    out = io.StringIO()
    view = LiveView(out, json=False, tty=True)
    view.show(response("hello", False))
    view.show(response("hello there", False))
    view.show(response("Hello there.", True))
    view.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 2  # each later line first erases the draft
    assert text.endswith("[00:01.00 -> 00:02.50] Hello there.\n")


def test_without_a_terminal_only_finals_are_printed() -> None:
    out = io.StringIO()
    view = LiveView(out, json=False, tty=False)
    view.show(response("hello", False))
    view.show(response("Hello there.", True))
    assert out.getvalue() == "[00:01.00 -> 00:02.50] Hello there.\n"


def test_json_prints_every_response_as_one_line() -> None:
    out = io.StringIO()
    view = LiveView(out, json=True, tty=True)
    view.show(response("hello", False))
    view.show(pb.StreamingTranscribeResponse(sequence=2, speech_event=pb.SpeechEvent(type=pb.END_OF_UTTERANCE)))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0]["result"]["text"] == "hello" and lines[1]["speech_event"]["type"] == "END_OF_UTTERANCE"


def test_voxctl_live_transcribes_a_file_against_a_real_server(inference: Any, capsys: Any) -> None:
    from voxctl.__main__ import main

    code = main(["--inference", inference.address, "live", str(DATA_DIR / "speech_short.wav"), "--speed", "4"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("[") for line in lines)  # not a terminal: final lines only
    text = " ".join(line.split("] ", 1)[1] for line in lines)
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text) <= 0.2


def test_voxctl_live_reads_raw_pcm_from_stdin(inference: Any, capsys: Any, monkeypatch: Any) -> None:
    from inference_service.audio import decode_audio
    from voxctl.__main__ import main

    samples = decode_audio((DATA_DIR / "speech_short.wav").read_bytes(), 22050)
    raw = (samples * 32767).astype("<i2").tobytes()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw)))
    code = main(["--inference", inference.address, "live", "-", "--rate", "22050", "--format", "json"])
    assert code == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    finals = [e["result"]["text"] for e in events if "result" in e and e["result"]["is_final"]]
    assert events[-1].get("completed") and word_error_rate(TRANSCRIPTS["speech_short.wav"], " ".join(finals)) <= 0.2
