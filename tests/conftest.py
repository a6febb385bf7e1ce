"""Fixtures shared by the suite: the loopback hub, a model store in-process, stubs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("HF_HUB_OFFLINE", None)

from hubserver import HubServer
from support import TINY_EN_DIR, TINY_EN_FILES, LoopThread

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED, CatalogEntry
from model_service.config import ModelStoreConfig
from voxserve.modelstore.v1 import modelstore_pb2_grpc

TINY_REPO = "test-org/faster-whisper-tiny.en"
TEXT_REPO = "test-org/text-files"


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


def text_repo_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"name": "text"}\n',
        "weights.bin": bytes(range(256)) * 8192,  # 2 MiB, LFS
        "sub/notes.txt": b"small text file in a subdirectory\n",
    }


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer()
    server.start()
    server.add_repo(TINY_REPO, {name: TINY_EN_DIR / name for name in TINY_EN_FILES})
    server.add_repo(TEXT_REPO, text_repo_files())
    yield server
    server.stop()


def make_catalog() -> dict[str, CatalogEntry]:
    return {
        "test-tiny": CatalogEntry(
            "test-tiny", "whisper", TINY_REPO, "main", WHISPER_FILES, WHISPER_REQUIRED, "tiny.en from the loopback hub"
        ),
        "test-text": CatalogEntry("test-text", "whisper", TEXT_REPO, "main", (), ("config.json",), "small files"),
    }


@pytest.fixture
def store_config(tmp_path: Path, hub: HubServer) -> ModelStoreConfig:
    return ModelStoreConfig(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        data_dir=tmp_path / "store",
        hub_endpoints=(hub.endpoint,),
        import_embedded=False,
        hub_timeout_seconds=5,
        heartbeat_seconds=0.5,
        log_format="json",
    )


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


@pytest.fixture
def start_store(loop_thread: LoopThread, store_config: ModelStoreConfig) -> Iterator[Callable[..., StoreHandle]]:
    handles: list[StoreHandle] = []

    def start(
        config: ModelStoreConfig | None = None, catalog: dict[str, CatalogEntry] | None = None, **overrides: Any
    ) -> StoreHandle:
        cfg = replace(config or store_config, **overrides)
        handle = StoreHandle(loop_thread, cfg, catalog if catalog is not None else make_catalog())
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        with contextlib.suppress(Exception):  # already stopped by the test
            handle.stop()


@pytest.fixture
def store(start_store: Callable[..., StoreHandle]) -> StoreHandle:
    return start_store()


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


@pytest.fixture
def start_inference(
    loop_thread: LoopThread, start_store: Callable[..., StoreHandle], tmp_path: Path
) -> Iterator[Callable[..., InferenceHandle]]:
    """start_inference(store=None, **config overrides): a store with the embedded models
    imported (unless given) and an inference service using it."""
    from inference_service.config import InferenceConfig

    handles: list[InferenceHandle] = []

    def start(store: StoreHandle | None = None, **overrides: Any) -> InferenceHandle:
        store = store or start_store(import_embedded=True)
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_port": -1,
            "model_store": store.address,
            "cache_dir": tmp_path / "inference-cache",
            "preload": (),
            "pin": (),
            "log_format": "json",
        }
        settings.update(overrides)
        handle = InferenceHandle(loop_thread, InferenceConfig(**settings), store)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        with contextlib.suppress(Exception):  # already stopped by the test
            handle.stop()


@pytest.fixture
def inference(start_inference: Callable[..., InferenceHandle]) -> InferenceHandle:
    return start_inference()
