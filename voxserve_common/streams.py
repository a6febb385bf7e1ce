"""Helpers for server-streaming RPCs fed by worker threads."""

from __future__ import annotations

import asyncio
import threading

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp from a time.time() value."""
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    if not event.is_set():
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            return False
    event.clear()
    return True


class Wakeup:
    """Thread-safe wake-up for one asyncio stream: worker threads call it (cheap, never
    blocks), the stream awaits ``wait`` and then reads what is new itself."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    async def wait(self, timeout: float | None) -> bool:
        """True when woken, False when ``timeout`` passed first."""
        return await _wait_event(self.event, timeout)


class Subscription:
    """One stream's share of a Broadcast."""

    def __init__(self, broadcast: Broadcast) -> None:
        self.broadcast = broadcast
        self.event = asyncio.Event()

    async def wait(self, timeout: float | None) -> bool:
        """True when woken, False when ``timeout`` passed first."""
        return await _wait_event(self.event, timeout)

    def close(self) -> None:
        self.broadcast.subscriptions.discard(self)


class Broadcast:
    """Wakes every subscribed stream of one event loop from any thread.

    A burst of calls costs one hop onto the loop however many streams listen (one
    ``call_soon_threadsafe`` per watcher per event was the store's fan-out bottleneck).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.subscriptions: set[Subscription] = set()
        self._lock = threading.Lock()
        self._scheduled = False

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self.subscriptions.add(subscription)
        return subscription

    def __call__(self) -> None:
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self.wake_all)

    def wake_all(self) -> None:
        """Set every subscription's event (call on the loop)."""
        with self._lock:
            self._scheduled = False
        for subscription in list(self.subscriptions):
            subscription.event.set()
