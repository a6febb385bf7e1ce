"""The gateway sends the routing key (x-voxserve-model) with each transcription for a named model, none for
the default one, and answers a call whose replica was lost mid-stream with 503 and Retry-After (OpenAI's
SDKs send it again)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from tests.http_gateway.conftest import GatewayHandle
from tests.recording_inference import Recorder, recorder
from tests.support import DATA_DIR

__all__ = ["recorder"]  # the fixture

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()


def post(gateway: GatewayHandle, model: str) -> tuple[int, dict[str, str], str]:
    with gateway.http() as http:
        response = http.post(
            "/v1/audio/transcriptions", files={"file": ("a.wav", SHORT, "audio/wav")}, data={"model": model}
        )
    return response.status_code, dict(response.headers), response.text


def test_a_named_model_travels_as_the_routing_header(
    start_gateway: Callable[..., GatewayHandle], recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    gateway = start_gateway(inference=SimpleNamespace(address=address))
    assert post(gateway, "whisper-base")[0] == 200
    assert post(gateway, "whisper-1")[0] == 200  # OpenAI's name: the service's default model
    assert servicer.calls == [("Transcribe", ["whisper-base"]), ("Transcribe", [])]


def test_a_stream_cut_by_a_lost_replica_is_503_with_retry_after(
    start_gateway: Callable[..., GatewayHandle], recorder: tuple[Recorder, str]
) -> None:
    servicer, address = recorder
    servicer.cut_first_transcribe = True
    gateway = start_gateway(inference=SimpleNamespace(address=address))
    status, headers, body = post(gateway, "whisper-base")
    assert status == 503 and headers["retry-after"] == "7", body
    assert "unavailable" in body
    assert post(gateway, "whisper-base")[0] == 200  # sent again: another replica answers
