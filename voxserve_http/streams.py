"""Async-iterator plumbing of the streaming routes: look at the first item before the
HTTP status is sent, keep quiet streams alive, and stop at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class _Mark:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


END = _Mark("END")  # the source has no more items
KEEPALIVE = _Mark("KEEPALIVE")  # nothing arrived for a while
STOPPED = _Mark("STOPPED")  # a stop event was set (shutdown)


class Prefetched(Generic[T]):
    """A source whose next item may already be in flight (a task), so that a route can
    wait for the first item before it answers (a backend that refuses at once then gives
    a proper HTTP status) and the response can go on with the same source."""

    def __init__(self, source: AsyncIterator[T]) -> None:
        self.source = source
        self._pending: asyncio.Task[T | _Mark] | None = None

    async def _pull(self) -> T | _Mark:
        try:
            return await anext(self.source)
        except StopAsyncIteration:
            return END

    def _task(self) -> asyncio.Task[T | _Mark]:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._pull())
        return self._pending

    async def wait_first(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` (None: as long as it takes) for the next item without
        taking it; the backend's error, if that is what comes in time, is raised here."""
        task = self._task()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if done and task.exception() is not None:
            self._pending = None
            task.result()

    async def next(self, timeout: float | None = None, stop: asyncio.Event | None = None) -> T | _Mark:
        """The next item, END, KEEPALIVE after ``timeout`` without one, or STOPPED once
        ``stop`` is set. The source's error is raised."""
        task = self._task()
        waiter = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            done, _ = await asyncio.wait(
                {task} if waiter is None else {task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if waiter is not None:
                waiter.cancel()
        if task in done:
            self._pending = None
            return task.result()
        return STOPPED if done else KEEPALIVE

    async def items(self) -> AsyncIterator[T]:
        """Every remaining item."""
        while True:
            item = await self.next()
            if isinstance(item, _Mark):
                return
            yield item

    async def aclose(self) -> None:
        """Cancel what is in flight and close the source (which cancels its gRPC call)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(self.source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class ClosingStream(StreamingResponse):
    """A streaming response that always runs ``on_close`` when it is over, also when the
    client left before its body was started (a generator's ``finally`` would not run)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()
