"""The OpenAI Python SDK against the gateway, on real gRPC servers and real audio."""

from __future__ import annotations

import itertools
import re
import socket
from collections.abc import Callable
from typing import Any

import openai
import pytest

from inference_service.jobs import JobState
from tests.http_gateway.conftest import GatewayHandle, long_wav
from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, wait_for, word_error_rate

SHORT = DATA_DIR / "speech_short.wav"
MULTI = DATA_DIR / "speech_multi.wav"
CONVERSATION = DATA_DIR / "conversation.ogg"
ENDED = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


def transcribe(client: openai.OpenAI, path: Any = MULTI, **kwargs: Any) -> Any:
    with open(path, "rb") as audio:
        return client.audio.transcriptions.create(model="whisper-1", file=audio, **kwargs)


def cues(document: str) -> list[tuple[str, str]]:
    """(timing line, text) of each SRT/VTT cue."""
    found = []
    for block in document.strip().split("\n\n"):
        lines = block.splitlines()
        timing = next(i for i, line in enumerate(lines) if "-->" in line)
        found.append((lines[timing], " ".join(lines[timing + 1 :])))
    return found


# --------------------------------------------------------------------------- formats


def test_json_transcript_of_real_speech(gateway: GatewayHandle) -> None:
    result = transcribe(gateway.client(), SHORT)
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], result.text) <= 0.25, result.text
    assert result.usage.type == "duration"
    assert 3.0 < result.usage.seconds < 3.5  # the file is 3.24 s


def test_every_response_format_has_the_same_text(gateway: GatewayHandle) -> None:
    client = gateway.client()
    reference = transcribe(client).text
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], reference) <= 0.35, reference

    assert transcribe(client, response_format="text") == reference + "\n"

    srt = transcribe(client, response_format="srt")
    srt_cues = cues(srt)
    assert len(srt_cues) >= 2
    assert [block.splitlines()[0] for block in srt.strip().split("\n\n")] == [
        str(n) for n in range(1, len(srt_cues) + 1)
    ]
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", timing) for timing, _ in srt_cues)
    assert " ".join(text for _, text in srt_cues) == reference

    vtt = transcribe(client, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    vtt_cues = cues(vtt.removeprefix("WEBVTT\n\n"))
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}", timing) for timing, _ in vtt_cues)
    assert [text for _, text in vtt_cues] == [text for _, text in srt_cues]


def test_verbose_json_with_word_and_segment_timestamps(gateway: GatewayHandle) -> None:
    result = transcribe(gateway.client(), response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert result.task == "transcribe"
    assert result.language == "en"
    assert 25.0 < result.duration < 25.3
    assert len(result.segments) >= 2
    assert " ".join(s.text.strip() for s in result.segments) == result.text
    assert [s.id for s in result.segments] == list(range(len(result.segments)))
    for earlier, later in zip(result.segments, result.segments[1:], strict=False):
        assert earlier.start <= earlier.end <= later.start
    words = result.words
    assert words and [w.word for w in words][:3] == ["Good", "morning,", "and"]
    assert all(w.start <= w.end for w in words)
    assert all(a.start <= b.start for a, b in itertools.pairwise(words))
    assert words[-1].end <= result.duration
    assert word_error_rate(" ".join(w.word for w in words), result.text) == 0


def test_verbose_json_granularities_choose_what_is_returned(gateway: GatewayHandle) -> None:
    client = gateway.client()
    default = transcribe(client, SHORT, response_format="verbose_json")
    assert default.segments and default.words is None
    words_only = transcribe(client, SHORT, response_format="verbose_json", timestamp_granularities=["word"])
    assert words_only.segments is None
    assert next(w.word for w in words_only.words) == "Please"


def test_stream_deltas_add_up_to_the_final_text(gateway: GatewayHandle) -> None:
    with open(MULTI, "rb") as audio:
        stream = gateway.client().audio.transcriptions.create(model="whisper-1", file=audio, stream=True)
        events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[-1] == "transcript.text.done"
    assert kinds.count("transcript.text.done") == 1
    deltas = [event.delta for event in events if event.type == "transcript.text.delta"]
    assert len(deltas) >= 2, "one delta per segment"
    done = events[-1]
    assert "".join(deltas) == done.text
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], done.text) <= 0.35
    assert done.usage is not None and done.usage.type == "duration"


def test_stream_delivers_text_while_the_job_runs(gateway: GatewayHandle, services: InferenceHandle) -> None:
    """The first delta arrives while the job is still decoding: the client then leaves,
    and the job (which had seconds of audio left) ends CANCELLED, not COMPLETED. Had the
    gateway buffered the transcription, the job would have completed before any text."""
    stream = gateway.client().audio.transcriptions.create(
        model="whisper-1", file=("long.wav", long_wav(4)), stream=True
    )
    job_id = stream.response.headers["x-voxserve-job-id"]
    first = next(iter(stream))
    assert first.type == "transcript.text.delta" and first.delta
    stream.close()
    job = services.app.jobs.get(job_id)
    wait_for(lambda: job.state in ENDED, timeout=60, message="job ended after the client left")
    assert job.state == JobState.CANCELLED


# --------------------------------------------------------------------------- translation, models


def test_translation_reaches_the_engine_as_a_translate_task(gateway: GatewayHandle) -> None:
    client = gateway.client()
    with open(SHORT, "rb") as audio, pytest.raises(openai.BadRequestError) as caught:
        client.audio.translations.create(model="whisper-1", file=audio)
    # Only a translate task gets this answer from an English-only model.
    assert "English-only and cannot translate" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


def test_models_are_the_stores_whisper_models_with_their_state(gateway: GatewayHandle) -> None:
    client = gateway.client()
    listed = {model.id: model for model in client.models.list()}
    assert "whisper-tiny.en" in listed and "whisper-large-v3" in listed
    assert "silero-vad" not in listed and "htdemucs" not in listed
    assert listed["whisper-tiny.en"].model_extra["state"] == "READY"
    assert listed["whisper-large-v3"].model_extra["state"] == "NOT_DOWNLOADED"
    one = client.models.retrieve("whisper-tiny.en")
    assert one.id == "whisper-tiny.en" and one.owned_by == "voxserve"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("silero-vad")
    assert "not a Whisper model" in caught.value.message
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("whisper-nonexistent")
    assert caught.value.code == "model_not_found"


# --------------------------------------------------------------------------- errors


def test_a_file_that_is_not_audio_is_a_bad_request(gateway: GatewayHandle) -> None:
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"these are notes, not audio\n" * 50))
    assert caught.value.status_code == 400
    assert caught.value.body["param"] is None or caught.value.body["param"] == "file"
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=("empty.wav", b""))
    assert caught.value.body["param"] == "file"


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"response_format": "xml"}, "response_format"),
        ({"temperature": 1.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"timestamp_granularities": ["word"]}, "timestamp_granularities[]"),  # needs verbose_json
        ({"timestamp_granularities": ["char"], "response_format": "verbose_json"}, "timestamp_granularities[]"),
        ({"language": "english!"}, "language"),
        ({"model": "../../etc/passwd"}, "model"),
        ({"response_format": "srt", "stream": True}, "stream"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(
    gateway: GatewayHandle, kwargs: dict[str, Any], param: str
) -> None:
    arguments = {"model": "whisper-1", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().audio.transcriptions.create(file=("short.wav", SHORT.read_bytes()), **arguments)
    assert caught.value.body["param"] == param, caught.value.body


def test_temperature_reaches_the_engine(gateway: GatewayHandle, services: InferenceHandle) -> None:
    with open(SHORT, "rb") as audio:
        raw = gateway.client().audio.transcriptions.with_raw_response.create(
            model="whisper-1", file=audio, temperature=0.2
        )
    text = raw.parse().text
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text) <= 0.5, text
    job = services.app.jobs.get(raw.headers["x-voxserve-job-id"])
    assert job.request.options.temperature == pytest.approx(0.2)
    # absent: the engine's own schedule (no temperature set)
    with open(SHORT, "rb") as audio:
        raw = gateway.client().audio.transcriptions.with_raw_response.create(model="whisper-1", file=audio)
    assert services.app.jobs.get(raw.headers["x-voxserve-job-id"]).request.options.temperature is None


def test_audio_over_the_single_message_size_streams_in_chunks(
    gateway: GatewayHandle, services: InferenceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Audio over SINGLE_MESSAGE_AUDIO_BYTES (60 MiB; lowered here, so 800 kB crosses it)
    goes to TranscribeStream in AUDIO_CHUNK_BYTES chunks, with the same transcript."""
    from voxserve_http import clients
    from voxserve_http.routes import openai as routes

    reference = transcribe(gateway.client()).text
    registry = services.app.metrics.registry

    def started(rpc: str) -> float:
        labels = {"method": f"/voxserve.inference.v1.Inference/{rpc}"}
        return registry.get_sample_value("voxserve_rpc_started_total", labels) or 0.0

    assert (started("Transcribe"), started("TranscribeStream")) == (1.0, 0.0)
    monkeypatch.setattr(routes, "SINGLE_MESSAGE_AUDIO_BYTES", 100_000)
    monkeypatch.setattr(clients, "AUDIO_CHUNK_BYTES", 256 << 10)  # speech_multi.wav: 4 chunks
    assert transcribe(gateway.client()).text == reference
    assert (started("Transcribe"), started("TranscribeStream")) == (1.0, 1.0)


def test_an_unknown_model_is_404_model_not_found(gateway: GatewayHandle) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().audio.transcriptions.create(model="whisper-nonexistent", file=("s.wav", SHORT.read_bytes()))
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"
    # stream=true answers with the status too: nothing is streamed before the model is found.
    with pytest.raises(openai.NotFoundError):
        gateway.client().audio.transcriptions.create(
            model="whisper-nonexistent", file=("s.wav", SHORT.read_bytes()), stream=True
        )


def test_an_upload_over_the_limit_is_413(gateway: GatewayHandle) -> None:
    too_big = b"\0" * (7 << 20)
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().audio.transcriptions.create(model="whisper-1", file=("big.wav", too_big))
    assert caught.value.status_code == 413
    assert caught.value.code == "upload_too_large"

    def chunks() -> Any:  # no Content-Length: the limit applies to the bytes as they come
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        for _ in range(7):
            yield b"\0" * (1 << 20)
        yield b"\r\n--x--\r\n"

    with gateway.http() as http:
        answer = http.post(
            "/v1/audio/transcriptions",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "upload_too_large"


def test_audio_over_the_inference_limit_is_413_not_429(
    start_inference: Callable[..., InferenceHandle], start_gateway: Callable[..., GatewayHandle]
) -> None:
    services = start_inference(max_audio_bytes=100_000)
    gateway = start_gateway(store=services.store, inference=services)
    with pytest.raises(openai.APIStatusError) as caught:
        transcribe(gateway.client(), MULTI)  # 800 kB
    assert caught.value.status_code == 413
    assert "over the limit of 100000 bytes" in caught.value.message
    # told apart from a full queue by the error category the service sent, not by its text
    assert caught.value.code == "audio_too_large"
    assert "retry-after" not in caught.value.response.headers  # the same request can never fit


def test_a_full_job_queue_is_429_with_retry_after(
    start_inference: Callable[..., InferenceHandle], start_gateway: Callable[..., GatewayHandle]
) -> None:
    services = start_inference(max_running_jobs=1, max_queued_jobs=0)
    gateway = start_gateway(store=services.store, inference=services)
    client = gateway.client()
    busy = client.audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(4)), stream=True)
    try:
        next(iter(busy))  # the first job is running now, with seconds of audio to go
        with pytest.raises(openai.RateLimitError) as caught:
            transcribe(client, SHORT)
        assert caught.value.status_code == 429
        assert caught.value.response.headers["retry-after"] == "7"
        assert caught.value.body["type"] == "rate_limit_error"
        assert caught.value.code == "resource_exhausted"
    finally:
        busy.close()


def test_a_backend_that_is_down_is_503_with_retry_after(start_gateway: Callable[..., GatewayHandle]) -> None:
    gateway = start_gateway()  # both addresses point at a closed port
    client = gateway.client()
    with pytest.raises(openai.InternalServerError) as caught:
        transcribe(client, SHORT)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "7"
    assert "inference service is unavailable" in caught.value.message
    with pytest.raises(openai.APIStatusError) as listed:
        client.models.list()
    assert listed.value.status_code == 503
    assert "model store is unavailable" in listed.value.message
    with gateway.http() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 503
        assert http.get("/healthz").status_code == 200


def test_a_client_that_leaves_a_plain_request_stops_its_job(gateway: GatewayHandle, services: InferenceHandle) -> None:
    """No streaming: the gateway still notices the disconnect and cancels the call."""
    registry = services.app.metrics.registry

    def count(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    audio = long_wav(4)
    head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n'
    body = head + audio + b"\r\n--x--\r\n"
    request = (
        f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=60) as client:
        client.sendall(request + body)
        wait_for(lambda: count("voxserve_jobs", state="running") == 1, timeout=120, message="the job runs")
    # the client went away mid-request, without reading an answer
    wait_for(lambda: count("voxserve_jobs", state="running") == 0, timeout=60, message="the job ended")
    assert count("voxserve_jobs_finished_total", outcome="cancelled") == 1
    assert count("voxserve_jobs_finished_total", outcome="completed") == 0


# --------------------------------------------------------------------------- speakers


def data_url(path: Any) -> str:
    import base64

    with open(path, "rb") as clip:
        return "data:audio/ogg;base64," + base64.b64encode(clip.read()).decode()


def test_diarized_json_names_known_speakers(gateway: GatewayHandle) -> None:
    client = gateway.client()
    result = transcribe(
        client,
        CONVERSATION,
        response_format="diarized_json",
        known_speaker_names=["Kennedy"],
        known_speaker_references=[data_url(DATA_DIR / "known_jfk.ogg")],
    )
    assert result.task == "transcribe" and 24.0 < result.duration < 24.4
    assert result.segments and all(s.type == "transcript.text.segment" for s in result.segments)
    assert [s.id for s in result.segments] == [f"seg_{n:03d}" for n in range(len(result.segments))]
    speakers = {s.speaker for s in result.segments}
    assert "Kennedy" in speakers and len(speakers) == 3, speakers
    kennedy = " ".join(s.text for s in result.segments if s.speaker == "Kennedy").lower()
    assert "country" in kennedy
    assert " ".join(s.text for s in result.segments) == result.text

    # verbose_json carries the speaker of each segment and word when asked to diarize.
    verbose = transcribe(
        client,
        CONVERSATION,
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        extra_body={"diarize": "true"},
    )
    assert verbose.segments and all(s.speaker.startswith("SPEAKER_") for s in verbose.segments)
    assert verbose.words and all(w.speaker for w in verbose.words)
    assert {s.speaker for s in verbose.segments} == {"SPEAKER_00", "SPEAKER_01", "SPEAKER_02"}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"known_speaker_names": ["A"]}, "known_speaker_references[]"),
        ({"known_speaker_names": ["A"], "known_speaker_references": ["http://x/a.wav"]}, "known_speaker_references[]"),
        ({"response_format": "diarized_json", "stream": True}, "stream"),
        ({"extra_body": {"diarize": "maybe"}}, "diarize"),
    ],
)
def test_bad_speaker_parameters_are_400(gateway: GatewayHandle, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().audio.transcriptions.create(
            model="whisper-1", file=("short.wav", SHORT.read_bytes()), **kwargs
        )
    assert caught.value.body["param"] == param, caught.value.body
