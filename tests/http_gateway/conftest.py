"""The HTTP gateway on uvicorn (127.0.0.1, a free port) in a thread of the test process,
talking to real gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.support import DATA_DIR, InferenceHandle, StoreHandle, wait_for
from voxserve_http.__main__ import GatewayServer
from voxserve_http.config import GatewayConfig

TEST_UPLOAD_LIMIT = 6 << 20  # 6 MiB: every file of the tests fits (long_wav() is 3.2 MB), 7 MiB does not


@dataclass
class GatewayHandle:
    server: GatewayServer
    thread: threading.Thread

    @property
    def base_url(self) -> str:
        return f"{self.server.scheme}://127.0.0.1:{self.server.port}"

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """The real OpenAI SDK pointed at the gateway; no retries, so each call is one request."""
        settings: dict[str, Any] = {"api_key": "unused", "max_retries": 0, "timeout": 300, **kwargs}
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **settings)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=300, **kwargs)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the gateway did not stop"


def run_gateway(config: GatewayConfig) -> GatewayHandle:
    server = GatewayServer(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            failure.append(error)

    thread = threading.Thread(target=run, name="gateway", daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), timeout=60, message="gateway started")
    assert server.started, f"the gateway did not start: {failure}"
    return GatewayHandle(server, thread)


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., GatewayHandle]]:
    """start_gateway(store=..., inference=..., **config overrides)."""
    handles: list[GatewayHandle] = []

    def start(
        store: StoreHandle | None = None, inference: InferenceHandle | None = None, **overrides: Any
    ) -> GatewayHandle:
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "model_store": store.address if store is not None else "127.0.0.1:1",
            "inference": inference.address if inference is not None else "127.0.0.1:1",
            "max_upload_bytes": TEST_UPLOAD_LIMIT,
            "retry_after_seconds": 7,
            "sse_keepalive_seconds": 0.5,
            "grace_seconds": 5,
        }
        settings.update(overrides)
        config = GatewayConfig(**settings)
        config.validate()
        handle = run_gateway(config)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        with contextlib.suppress(Exception):  # already stopped by the test
            handle.stop()


@pytest.fixture
def services(start_inference: Callable[..., InferenceHandle]) -> InferenceHandle:
    """An inference service over a store with the embedded tiny.en (the default model)."""
    return start_inference()


@pytest.fixture
def gateway(start_gateway: Callable[..., GatewayHandle], services: InferenceHandle) -> GatewayHandle:
    return start_gateway(store=services.store, inference=services)


def long_wav(repeats: int = 4) -> bytes:
    """speech_multi.wav (25 s) played ``repeats`` times in one WAV: a job that runs for
    seconds after its first segment, so a test can act while it is still running."""
    with wave.open(str(DATA_DIR / "speech_multi.wav"), "rb") as source:
        params = source.getparams()
        frames = source.readframes(source.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setparams(params)
        target.writeframes(frames * repeats)
    return out.getvalue()


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Server-sent events from response lines: {"id", "event", "data"} (data parsed as
    JSON); comment lines are skipped."""
    event: dict[str, Any] = {}
    for line in lines:
        if not line:
            if event:
                yield event
                event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            event["data"] = json.loads(value)
        elif name == "id":
            event["id"] = int(value)
        else:
            event[name] = value
    if event:
        yield event
