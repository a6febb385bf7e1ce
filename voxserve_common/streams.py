"""Helpers for server-streaming RPCs fed by worker threads."""

from __future__ import annotations

import asyncio

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp from a time.time() value."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class Wakeup:
    """Thread-safe wake-up for an asyncio stream: worker threads call it (cheap, never
    blocks), the stream awaits ``wait`` and then reads what is new itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float | None) -> bool:
        """True when woken, False when ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True
