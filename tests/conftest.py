"""Fixtures shared by the suite: the loopback hub, a model store and an inference service in-process."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("HF_HUB_OFFLINE", None)
# A shell without job control starts background commands (`cmd &`, nohup) with SIGINT
# ignored, and an ignored signal stays ignored in every process the suite starts: voxctl
# would not stop on the Ctrl-C the CLI tests send. Handled, it is reset on exec.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from model_service.catalog import CatalogEntry
from model_service.config import ModelStoreConfig
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    InferenceHandle,
    LoopThread,
    StoreHandle,
    make_catalog,
    text_repo_files,
    tiny_en_files,
)
from voxserve_common.logs import stop_logging


@pytest.fixture
def restore_root() -> Iterator[None]:
    """Undo a test's configure_logging: stop its listener, put back the root logger's
    handlers and level and the faster_whisper logger's level."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_library = logging.getLogger("faster_whisper").level
    yield
    stop_logging()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.getLogger("faster_whisper").setLevel(saved_library)


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer()
    server.start()
    server.add_repo(TINY_REPO, tiny_en_files())
    server.add_repo(TEXT_REPO, text_repo_files())
    yield server
    server.stop()


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
        # Tests import from their own temporary directories and the packaged tiny.en.
        import_roots=(tmp_path, TINY_EN_DIR),
    )


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


@pytest.fixture
def start_inference(
    loop_thread: LoopThread, start_store: Callable[..., StoreHandle], tmp_path: Path
) -> Iterator[Callable[..., InferenceHandle]]:
    """start_inference(store=None, **config overrides): a store with the embedded models
    imported (unless given) and an inference service using it."""
    from inference_service.config import InferenceConfig

    handles: list[InferenceHandle] = []
    made: list[StoreHandle] = []  # one store for the calls that name none: one store per data dir

    def start(store: StoreHandle | None = None, **overrides: Any) -> InferenceHandle:
        if store is None:
            if not made:
                made.append(start_store(import_embedded=True))
            store = made[0]
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
