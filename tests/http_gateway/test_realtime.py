"""/v1/realtime?intent=transcription on real servers: the real OpenAI SDK's realtime clients
(beta: transcription_session.update; GA: session.update) stream real speech at real-time
pace; the websockets client sends what the SDK cannot (bad events, raw frames, browser
subprotocols)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import websockets
import yaml
from websockets.exceptions import ConnectionClosed, InvalidStatus

from inference_service.audio import decode_audio
from tests.http_gateway.conftest import GatewayHandle
from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, wait_for, word_error_rate
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_common.auth import token_sha256

# tiny.en on this espeak speech, resampled to 24 kHz and back: 0.0 on an idle 2-core machine,
# as for StreamingTranscribe itself (tests/inference/test_live_stream.py); the bound leaves
# room for a loaded machine, where decodes come later and on longer buffers.
WER_BOUND = 0.1
CHUNK_MS = 100
DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"


def pcm16(name: str, rate: int) -> bytes:
    samples = decode_audio((DATA_DIR / name).read_bytes(), rate)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(audio: bytes, rate: int, silence_seconds: float = 0.0) -> list[str]:
    """base64 appends of CHUNK_MS each, then silence (so the engine hears the last endpoint)."""
    step = rate * 2 * CHUNK_MS // 1000
    audio += b"\0\0" * int(rate * silence_seconds)
    return [base64.b64encode(audio[i : i + step]).decode() for i in range(0, len(audio), step)]


async def at_real_time(appends: list[str], send: Callable[[str], Any]) -> None:
    for append in appends:
        await send(append)
        await asyncio.sleep(CHUNK_MS / 1000)


def ws_url(gateway: GatewayHandle, query: str = "?intent=transcription") -> str:
    return f"ws://127.0.0.1:{gateway.server.port}/v1/realtime{query}"


def sdk(gateway: GatewayHandle, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=f"{gateway.base_url}/v1",
        websocket_base_url=f"ws://127.0.0.1:{gateway.server.port}/v1",
    )


def check_items(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Every item's events in OpenAI's order; (transcript, its deltas added up) per item, in order."""
    done: dict[str, str] = {}
    deltas: dict[str, str] = {}
    committed: set[str] = set()
    for event in events:
        item = event.get("item_id")
        if event["type"] == "input_audio_buffer.committed":
            committed.add(item)
        if event["type"] == DELTA:
            assert item not in done, "a delta after its item completed"
            assert event["delta"]
            deltas[item] = deltas.get(item, "") + event["delta"]
        if event["type"] == COMPLETED:
            assert item in committed, "completed before committed"
            assert item not in done, "an item completed twice: a completion changed"
            done[item] = event["transcript"]
    return [(text, deltas.get(item, "")) for item, text in done.items()]


def test_the_openai_sdk_transcribes_live_speech_with_server_vad(gateway: GatewayHandle) -> None:
    """Beta client, pcm16 at 24 kHz: speech_started .. speech_stopped per utterance, deltas
    before each completion, completions that never change, and the words of the speech."""
    appends = chunks(pcm16("speech_multi.wav", 24000), 24000, silence_seconds=1.5)
    events: list[dict[str, Any]] = []

    async def main() -> None:
        client = sdk(gateway)
        async with client.beta.realtime.connect(model="whisper-1", extra_query={"intent": "transcription"}) as conn:
            assert (await conn.recv()).type == "transcription_session.created"
            session = {
                "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": "whisper-1", "language": "en"},
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 500},
            }
            await conn.transcription_session.update(session=session)  # type: ignore[arg-type]
            updated = await conn.recv()
            assert updated.type == "transcription_session.updated"

            async def read() -> None:
                async for event in conn:
                    events.append(event.to_dict())
                    if event.type == COMPLETED and "next week" in event.to_dict()["transcript"]:
                        return

            reader = asyncio.create_task(read())
            await at_real_time(appends, lambda a: conn.input_audio_buffer.append(audio=a))
            await asyncio.wait_for(reader, 120)

    asyncio.run(main())
    items = check_items(events)
    transcripts = [text for text, _ in items]
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], " ".join(transcripts)) <= WER_BOUND
    assert len(transcripts) >= 3, "the pauses between sentences make items"
    kinds = [e["type"] for e in events]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index(DELTA) < kinds.index(COMPLETED)
    starts = [e["audio_start_ms"] for e in events if e["type"] == "input_audio_buffer.speech_started"]
    assert starts == sorted(starts) and starts[-1] > 15000  # session audio time
    added_up = [text for text, deltas in items if deltas == text]
    assert added_up, "the deltas of an item add up to its transcript unless the final decode rewrote a word"


# The SDK's GA types know only 24 kHz pcm and pick the conversation session's type first when
# it reads a session back; the events are right, its to_dict() warns.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_ga_client_commits_by_hand_at_the_sessions_own_rate(gateway: GatewayHandle) -> None:
    """GA client, turn_detection null, pcm16 at 16 kHz: a commit makes one item; clear; an
    empty commit is an error event and the session goes on."""
    appends = chunks(pcm16("speech_short.wav", 16000), 16000)
    events: list[dict[str, Any]] = []

    async def main() -> None:
        client = sdk(gateway)
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            assert (await conn.recv()).type == "session.created"
            audio_input = {
                "format": {"type": "audio/pcm", "rate": 16000},
                "transcription": {"model": "whisper-tiny.en", "language": "en"},
                "turn_detection": None,
            }
            await conn.session.update(session={"type": "transcription", "audio": {"input": audio_input}})  # type: ignore[typeddict-item]
            updated = (await conn.recv()).to_dict()
            assert updated["type"] == "session.updated"
            assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
            await at_real_time(appends, lambda a: conn.input_audio_buffer.append(audio=a))
            await conn.input_audio_buffer.commit()
            while not events or events[-1]["type"] != COMPLETED:
                events.append((await asyncio.wait_for(conn.recv(), 120)).to_dict())
            await conn.input_audio_buffer.append(audio=appends[0])
            await conn.input_audio_buffer.clear()
            assert (await conn.recv()).type == "input_audio_buffer.cleared"
            await conn.input_audio_buffer.commit()
            error = (await conn.recv()).to_dict()
            assert error["type"] == "error" and error["error"]["code"] == "input_audio_buffer_commit_empty"

    asyncio.run(main())
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["input_audio_buffer.committed", "conversation.item.added"]
    assert "input_audio_buffer.speech_started" not in kinds  # the client decides the turns
    ((transcript, _),) = check_items(events)
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], transcript) <= WER_BOUND


def test_bad_events_get_error_events_and_the_connection_stays_open(
    start_gateway: Any, services: InferenceHandle
) -> None:
    gateway = start_gateway(store=services.store, inference=services, realtime_max_message_bytes=8192)

    async def main() -> list[dict[str, Any]]:
        async with websockets.connect(ws_url(gateway)) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"  # no beta header: GA
            bad: list[str | bytes] = [
                "not json",
                json.dumps({"no": "type"}),
                json.dumps({"type": "response.create", "event_id": "evt_1"}),
                json.dumps({"type": "input_audio_buffer.append", "audio": "%%%"}),
                json.dumps({"type": "input_audio_buffer.commit"}),
                json.dumps({"type": "session.update", "session": {"type": "realtime"}}),
                json.dumps(
                    {"type": "transcription_session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}
                ),
                json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 9000}),
                b"\x00\x01",
            ]
            errors = []
            for message in bad:
                await ws.send(message)
                errors.append(json.loads(await ws.recv()))
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {"turn_detection": None}}))
            assert json.loads(await ws.recv())["type"] == "transcription_session.updated"
            return errors

    errors = asyncio.run(main())
    assert all(e["type"] == "error" and e["error"]["message"] for e in errors)
    codes = [e["error"]["code"] for e in errors]
    assert codes == [
        "invalid_json",
        "invalid_event",
        "invalid_event_type",
        "invalid_value",
        "input_audio_buffer_commit_empty",
        "invalid_value",
        "invalid_value",
        "message_too_large",
        "invalid_event",
    ]
    assert errors[2]["error"]["event_id"] == "evt_1"  # OpenAI's shape: the client event it answers
    assert errors[6]["error"]["param"] == "session.turn_detection.type"


def test_session_and_idle_limits_are_error_events_then_a_close(start_gateway: Any, services: InferenceHandle) -> None:
    gateway = start_gateway(
        store=services.store, inference=services, realtime_max_sessions=1, realtime_idle_seconds=1.0
    )

    async def main() -> None:
        async with websockets.connect(ws_url(gateway)) as first:
            await first.recv()
            async with websockets.connect(ws_url(gateway)) as second:
                refused = json.loads(await second.recv())
                assert refused["error"]["code"] == "session_limit_reached"
                with pytest.raises(ConnectionClosed) as closed:
                    await second.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            idle = json.loads(await asyncio.wait_for(first.recv(), 30))
            assert idle["error"]["code"] == "idle_timeout"
            with pytest.raises(ConnectionClosed):
                await first.recv()

    asyncio.run(main())


def test_a_leaving_client_ends_its_live_stream_at_once(gateway: GatewayHandle, services: InferenceHandle) -> None:
    appends = chunks(pcm16("speech_multi.wav", 24000), 24000)

    async def main() -> None:
        async with websockets.connect(ws_url(gateway)) as ws:
            await ws.recv()
            await at_real_time(
                appends[:20], lambda a: ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": a}))
            )
            await asyncio.to_thread(wait_for, lambda: services.app.live.active() == 1, 60, message="stream open")

    asyncio.run(main())
    wait_for(lambda: services.app.live.active() == 0, 30, message="the live stream ended with its client")
    loaded = services.stub.ListLoadedModels(ipb.ListLoadedModelsRequest()).models
    wait_for(
        lambda: all(m.in_use == 0 for m in services.stub.ListLoadedModels(ipb.ListLoadedModelsRequest()).models),
        30,
        message="the stream's leases were released",
    )
    assert loaded, "the stream loaded its models"


TRANSCRIBER_TOKEN = "transcriber-token-0123456789"
READER_TOKEN = "reader-token-0123456789"


@pytest.fixture
def guarded(start_inference: Any, start_gateway: Any, tmp_path: Path) -> GatewayHandle:
    tokens = tmp_path / "tokens.yaml"
    entries = {
        "transcriber": {"sha256": token_sha256(TRANSCRIBER_TOKEN), "roles": ["transcribe", "read"]},
        "reader": {"sha256": token_sha256(READER_TOKEN), "roles": ["read"]},
    }
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    services = start_inference(auth_tokens=tokens)
    handle: GatewayHandle = start_gateway(store=services.store, inference=services)
    return handle


def test_tokens_are_checked_before_the_upgrade_as_on_every_route(guarded: GatewayHandle) -> None:
    async def status(**kwargs: Any) -> int:
        try:
            async with websockets.connect(ws_url(guarded), **kwargs) as ws:
                assert json.loads(await ws.recv())["type"] in ("session.created", "transcription_session.created")
                return 101
        except InvalidStatus as refused:
            body = json.loads(refused.response.body or b"{}")
            assert body["error"]["message"]
            return refused.response.status_code

    async def main() -> None:
        assert await status() == 401
        assert await status(additional_headers={"Authorization": f"Bearer {READER_TOKEN}"}) == 403
        assert await status(additional_headers={"Authorization": f"Bearer {TRANSCRIBER_TOKEN}"}) == 101
        # A browser's form: the token in a subprotocol, "realtime" chosen by the server.
        browser = ["realtime", f"openai-insecure-api-key.{TRANSCRIBER_TOKEN}", "openai-beta.realtime-v1"]
        async with websockets.connect(ws_url(guarded), subprotocols=browser) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "transcription_session.created"
        with pytest.raises(InvalidStatus):
            async with sdk(guarded, api_key="wrong").beta.realtime.connect(
                model="whisper-1", extra_query={"intent": "transcription"}
            ):
                pass
        assert await status() == 401

    asyncio.run(main())


def test_only_transcription_sessions_are_served(gateway: GatewayHandle) -> None:
    async def main() -> None:
        for query in ("", "?intent=conversation", "?intent=transcription&model=..%2Fx"):
            with pytest.raises(InvalidStatus) as refused:
                async with websockets.connect(ws_url(gateway, query)):
                    pass
            assert refused.value.response.status_code == 400

    asyncio.run(main())
