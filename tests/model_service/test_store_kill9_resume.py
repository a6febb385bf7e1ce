"""A store killed with SIGKILL mid-download resumes from its partial file after restart.

Also home of ``StoreProcess``: the model store as a real subprocess (``python -m
model_service``), which the restart and observability tests reuse.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import TINY_REPO
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hubserver import HubServer
from support import TINY_EN_DIR, free_port, wait_for

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_catalog(path: Path, model_id: str = "test-tiny") -> Path:
    """A user catalog file with one entry for the loopback hub's tiny.en repo."""
    entry = {
        "kind": "whisper",
        "repo_id": TINY_REPO,
        "revision": "main",
        "allow_patterns": list(WHISPER_FILES),
        "required_files": list(WHISPER_REQUIRED),
    }
    path.write_text(yaml.safe_dump({"models": {model_id: entry}}))
    return path


class StoreProcess:
    """``python -m model_service`` on a free port, stderr captured to a file."""

    def __init__(
        self,
        tmp_path: Path,
        data_dir: Path,
        hub: HubServer,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        name: str = "store",
    ) -> None:
        self.port = free_port()
        self.stderr_path = tmp_path / f"{name}-{self.port}.stderr"
        catalog = write_catalog(tmp_path / "catalog.yaml")
        args = [
            sys.executable, "-m", "model_service",
            "--port", str(self.port),
            "--metrics-port", "-1",
            "--data-dir", str(data_dir),
            "--hub-endpoint", hub.endpoint,
            "--catalog", str(catalog),
            "--log-format", "json",
            *extra_args,
        ]  # fmt: skip
        full_env = {**os.environ, "VOXSERVE_IMPORT_EMBEDDED": "false", "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})}
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = modelstore_pb2_grpc.ModelStoreStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_serving(self, timeout: float = 30) -> None:
        def serving() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"store exited with {self.process.returncode}: {self.stderr()}")
            try:
                reply = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            except grpc.RpcError:
                return False
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        wait_for(serving, timeout=timeout, interval=0.1, message="store subprocess SERVING")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flushing, like a crash."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.channel.close()

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def store_processes() -> Iterator[list[StoreProcess]]:
    """Every StoreProcess a test appends is killed at the end, whatever happened."""
    processes: list[StoreProcess] = []
    try:
        yield processes
    finally:
        for process in processes:
            process.close()


def start_pull_thread(stub: modelstore_pb2_grpc.ModelStoreStub, model_id: str) -> tuple[threading.Thread, dict]:
    result: dict = {"events": []}

    def run() -> None:
        try:
            for event in stub.PullModel(pb.PullModelRequest(model_id=model_id), timeout=120):
                result["events"].append(event)
        except grpc.RpcError as error:
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def partial_size(data_dir: Path, model_id: str, name: str) -> int:
    part = data_dir / "partial" / model_id / f"{name}.part"
    return part.stat().st_size if part.is_file() else 0


def kill_mid_download(
    tmp_path: Path, data_dir: Path, hub: HubServer, store_processes: list[StoreProcess], min_bytes: int
) -> None:
    """Start a throttled pull of test-tiny in a subprocess store and SIGKILL it once
    ``min_bytes`` of model.bin are in its partial file."""
    hub.throttle(8 << 20, path="model.bin")
    first = StoreProcess(tmp_path, data_dir, hub, name="first")
    store_processes.append(first)
    first.wait_serving()
    thread, _ = start_pull_thread(first.stub, "test-tiny")
    wait_for(
        lambda: partial_size(data_dir, "test-tiny", "model.bin") > min_bytes,
        timeout=60,
        message="partial model.bin grows",
    )
    first.kill()
    thread.join(10)
    hub.throttle(None)


def test_kill9_mid_download_resumes_with_range_after_restart(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = tmp_path / "data"
    size = (TINY_EN_DIR / "model.bin").stat().st_size
    kill_mid_download(tmp_path, data_dir, hub, store_processes, min_bytes=20_000_000)
    kept = partial_size(data_dir, "test-tiny", "model.bin")
    assert kept > 20_000_000, "the partial file must survive SIGKILL"
    hub.reset_stats()

    second = StoreProcess(tmp_path, data_dir, hub, name="second")
    store_processes.append(second)
    second.wait_serving()
    events = list(second.stub.PullModel(pb.PullModelRequest(model_id="test-tiny"), timeout=120))
    assert events[-1].state == pb.READY

    served = hub.bytes_served(TINY_REPO, "model.bin")
    assert served < size - 15_000_000, f"resume re-fetched {served} of {size} bytes"
    # Not an exact match: the hub may still push a chunk into the killed client's socket
    # after reset_stats(). The Range header below pins where the new process resumed.
    assert served >= size - kept
    ranges = [r.headers.get("Range", "") for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]
    assert f"bytes={kept}-" in ranges, ranges
    model = second.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"))
    assert model.state == pb.READY
    on_disk = Path(model.local_path) / "model.bin"
    expected = hashlib.sha256((TINY_EN_DIR / "model.bin").read_bytes()).hexdigest()
    assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == expected
    assert {f.path: f.sha256 for f in model.files}["model.bin"] == expected
    assert not (data_dir / "partial" / "test-tiny").exists()
