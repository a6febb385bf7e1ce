"""The gateway as its own process (the voxserve-http entry point), trace context and
credentials passed on to the gRPC services, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import yaml

from model_service.__main__ import SERVICE_NAME, build_store
from model_service.config import ModelStoreConfig
from model_service.servicer import ModelStoreServicer
from tests.http_gateway.conftest import GatewayHandle, sse_events
from tests.support import DATA_DIR, REPO_ROOT, InferenceHandle, LoopThread, free_port, make_catalog, wait_for
from voxserve.modelstore.v1 import modelstore_pb2_grpc
from voxserve_common.auth import Authenticator, token_sha256
from voxserve_common.logs import ContextFilter
from voxserve_common.server import RunningServer, start_server

READER_TOKEN = "reader-token-0123456789"
ADMIN_TOKEN = "admin-token-9876543210"


@pytest.fixture
def guarded_store(loop_thread: LoopThread, store_config: ModelStoreConfig, tmp_path: Path) -> Iterator[str]:
    """A real model store whose server checks bearer tokens (voxserve_common.auth)."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": {
                    "reader": {"sha256": token_sha256(READER_TOKEN), "roles": ["read"]},
                    "ops": {"sha256": token_sha256(ADMIN_TOKEN), "roles": ["admin"]},
                }
            }
        )
    )
    store = build_store(store_config, make_catalog())
    store.start()

    async def start() -> RunningServer:
        servicer = ModelStoreServicer(store, store_config.heartbeat_seconds, asyncio.Event())
        return await start_server(
            register=lambda s: modelstore_pb2_grpc.add_ModelStoreServicer_to_server(servicer, s),
            service_names=[SERVICE_NAME],
            host="127.0.0.1",
            port=0,
            rpc_metrics=store.metrics.rpc,
            authenticator=Authenticator(tokens),
        )

    server = loop_thread.run(start())
    yield server.address
    loop_thread.run(server.stop(0.5))
    store.close()


def test_authorization_is_forwarded_and_its_refusals_mapped(
    guarded_store: str, start_gateway: Callable[..., GatewayHandle]
) -> None:
    gateway = start_gateway(model_store=guarded_store)
    with gateway.http() as http:
        missing = http.get("/api/models")
        assert missing.status_code == 401
        assert missing.json()["error"]["type"] == "authentication_error"
        reader = {"Authorization": f"Bearer {READER_TOKEN}"}
        assert http.get("/api/models", headers=reader).status_code == 200
        forbidden = http.post("/api/models/test-text/pull", headers=reader)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["type"] == "permission_error"
        assert "lacks the role 'pull'" in forbidden.json()["error"]["message"]
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with http.stream("POST", "/api/models/test-text/pull", headers=admin) as response:
            assert response.status_code == 200
            assert json.loads(list(response.iter_lines())[-1])["state"] == "READY"
        garbled = http.get("/api/models", headers={"Authorization": "Bearer caf\xe9".encode("latin-1")})
        assert garbled.status_code == 401
        assert garbled.json()["error"]["code"] == "malformed_authorization"
    # The openai SDK sends its api_key as the bearer token.
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="not-a-token").models.list()
    assert [m.id for m in gateway.client(api_key=READER_TOKEN).models.list()]


class _Records(logging.Handler):
    """Records of this process's servers with the trace id they were logged under."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(ContextFilter("test"))
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class GatewayProcess:
    def __init__(self, tmp_path: Path, services: InferenceHandle) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.stderr_path = tmp_path / "gateway.stderr"
        args = [
            sys.executable, "-m", "voxserve_http",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port),
            "--inference", services.address, "--store", services.store.address,
            "--log-format", "json",
        ]  # fmt: skip
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                args, cwd=REPO_ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=stderr
            )
        self.base_url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited with {self.process.returncode}: {self.stderr()}")
            try:
                return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=60, interval=0.1, message="gateway process ready")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stderr().splitlines() if line.startswith("{")]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def gateway_process(tmp_path: Path, services: InferenceHandle) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path, services)
    yield process
    process.close()


def test_the_entry_point_traces_logs_counts_and_stops_gracefully(
    gateway_process: GatewayProcess, services: InferenceHandle
) -> None:
    gateway_process.wait_ready()
    records = _Records()
    root = logging.getLogger()
    saved_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(records)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    try:
        client = openai.OpenAI(
            base_url=f"{gateway_process.base_url}/v1",
            api_key="unused",
            max_retries=0,
            default_headers={"traceparent": traceparent},
        )
        with open(DATA_DIR / "speech_short.wav", "rb") as audio:
            assert client.audio.transcriptions.create(model="whisper-1", file=audio).text
    finally:
        root.removeHandler(records)
        root.setLevel(saved_level)
    # The inference service (in this process) handled the call inside the caller's trace.
    traced = [r for r in records.records if getattr(r, "trace_id", None) == trace_id]
    assert any(r.getMessage() == "rpc finished" and "Transcribe" in str(r.method) for r in traced), [
        (r.getMessage(), getattr(r, "trace_id", None)) for r in records.records
    ]

    counted = 'voxserve_http_requests_total{route="/v1/audio/transcriptions",status="200"} 1.0'

    def scrape() -> str:
        text = httpx.get(f"http://127.0.0.1:{gateway_process.metrics_port}/metrics", timeout=10).text
        return text if counted in text else ""

    # counted when the request's handling ends, just after the client has the answer
    metrics = wait_for(scrape, timeout=30, message=counted)
    assert 'voxserve_http_request_duration_seconds_count{route="/v1/audio/transcriptions"} 1.0' in metrics
    assert "process_resident_memory_bytes" in metrics

    # An open event stream ends with a shutdown event when SIGTERM arrives.
    with httpx.stream("GET", f"{gateway_process.base_url}/api/events", timeout=60) as response:
        events = sse_events(response.iter_lines())
        for event in events:
            if event.get("event") == "snapshot_end":
                break
        gateway_process.process.send_signal(signal.SIGTERM)
        rest = list(events)
    assert rest[-1]["event"] == "shutdown"
    assert gateway_process.process.wait(60) == 0

    logs = gateway_process.logs()
    finished = [line for line in logs if line["message"] == "http request finished"]
    transcription = next(line for line in finished if line["route"] == "/v1/audio/transcriptions")
    assert transcription["trace_id"] == trace_id
    assert transcription["status"] == 200
    assert transcription["service"] == "http_gateway"
    assert any(line["message"] == "gateway stopped" for line in logs)


def test_a_bad_setting_exits_2_naming_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "voxserve_http", "--port", "70000"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "port" in result.stderr
    env = {**os.environ, "VOXSERVE_MAX_UPLOAD_BYTES": "lots"}
    result = subprocess.run(
        [sys.executable, "-m", "voxserve_http"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 2
    assert "VOXSERVE_MAX_UPLOAD_BYTES" in result.stderr
