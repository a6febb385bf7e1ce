"""A sequenced event log with bounded history, appended from threads and followed by asyncio streams."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeAlias, TypeVar


class Sequenced(Protocol):
    @property
    def sequence(self) -> int: ...


T = TypeVar("T", bound=Sequenced)


@dataclass
class Resync:
    """The events after ``after`` are no longer kept (or ``after`` is past ``sequence``,
    e.g. from another incarnation of the log). The follower sends the whole current
    state instead and calls ``resume_after`` with the sequence that state corresponds
    to; without that call following resumes after ``sequence``, the log's sequence when
    the gap was found."""

    after: int
    sequence: int
    resume: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        self.resume = self.sequence

    @property
    def from_the_future(self) -> bool:
        return self.after > self.sequence

    def resume_after(self, sequence: int) -> None:
        self.resume = sequence


@dataclass(frozen=True)
class Heartbeat:
    """Nothing was yielded for ``heartbeat`` seconds; ``sequence`` is the resume point."""

    sequence: int


@dataclass(frozen=True)
class End:
    """The last item of a follow: the log was closed (``closed``) or a stop event was set.
    Every event up to ``sequence`` was considered; resume after it."""

    sequence: int
    closed: bool


Followed: TypeAlias = T | Resync | Heartbeat | End


class _LoopFollowers:
    """The followers waiting on one event loop, woken together by one loop hop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.wakeups: set[asyncio.Event] = set()  # touched on the loop thread only
        self.scheduled = False  # guarded by the log's lock


class EventLog(Generic[T]):
    """Stamps each appended event with the next sequence, keeps the last ``history_size``
    events and wakes followers.

    Appends come from any thread and never block on a follower: a follower reads what is
    new itself, so a slow one only falls behind, and one that falls out of the history
    is told to resync. A burst of appends costs one ``call_soon_threadsafe`` per event
    loop however many followers wait on it (one hop per follower per event was the
    model store's fan-out bottleneck with hundreds of watchers).
    """

    def __init__(self, history_size: int, first_sequence: int = 0) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque[T] = collections.deque(maxlen=history_size)
        self._sequence = first_sequence
        self._closed = False
        self._loops: dict[asyncio.AbstractEventLoop, _LoopFollowers] = {}

    @property
    def sequence(self) -> int:
        """The sequence of the last appended event (``first_sequence`` before any)."""
        return self._sequence

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def loop_count(self) -> int:
        """Event loops with followers: the wake-ups one append schedules at most."""
        with self._lock:
            return len(self._loops)

    @property
    def follower_count(self) -> int:
        with self._lock:
            return sum(len(group.wakeups) for group in self._loops.values())

    def append(self, make: Callable[[int], T]) -> T:
        """Record ``make(sequence)`` under the next sequence and wake the followers.

        ``make`` runs under the log's lock, so events enter the history in sequence
        order. Raises RuntimeError once the log is closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("append to a closed event log")
            event = make(self._sequence + 1)
            self._sequence += 1
            self._history.append(event)
            due = self._due_wakeups()
        self._schedule(due)
        return event

    def close(self) -> None:
        """Mark the end of the log: followers get the remaining events, then End."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            due = self._due_wakeups()
        self._schedule(due)

    def events_after(self, sequence: int) -> list[T] | None:
        """Events with sequence > ``sequence``, oldest first; None when some of them left
        the history or ``sequence`` is past the log's (another incarnation's)."""
        with self._lock:
            if sequence > self._sequence:
                return None
            count = self._sequence - sequence
            history = self._history
            if count > len(history):
                return None
            return [history[-i] for i in range(count, 0, -1)]

    def history(self) -> list[T]:
        """Every event still in the bounded history, oldest first."""
        with self._lock:
            return list(self._history)

    async def follow(
        self,
        after_sequence: int,
        *,
        filter: Callable[[T], bool] | None = None,
        heartbeat: float | None = None,
        stop: Sequence[asyncio.Event] = (),
    ) -> AsyncGenerator[Followed[T], None]:
        """Every event after ``after_sequence`` that passes ``filter``, live, with markers:
        Resync when the history cannot serve the resume point, Heartbeat after
        ``heartbeat`` seconds without an item, and End, the last item, when the log is
        closed or one of ``stop`` is set (after the events appended before that).

        Events that ``filter`` drops still move the resume point (Heartbeat.sequence,
        End.sequence), so a filtered follower that reconnects does not replay them.
        Close the generator (``contextlib.aclosing``) to stop following at once.
        """
        loop = asyncio.get_running_loop()
        wakeup = asyncio.Event()
        group = self._join(loop, wakeup)
        stop_waits = [asyncio.ensure_future(event.wait()) for event in stop]
        for waiting in stop_waits:
            waiting.add_done_callback(lambda _: wakeup.set())
        cursor = after_sequence
        last_item = loop.time()
        try:
            while True:
                # Cleared before reading: an append after the read sets it again.
                wakeup.clear()
                stopping = any(event.is_set() for event in stop)
                closed = self._closed
                events = self.events_after(cursor)
                if events is None:
                    resync = Resync(cursor, self._sequence)
                    yield resync
                    cursor = resync.resume
                    last_item = loop.time()
                    continue
                for event in events:
                    cursor = event.sequence
                    if filter is None or filter(event):
                        yield event
                        last_item = loop.time()
                if closed or stopping:
                    yield End(cursor, closed=closed)
                    return
                if wakeup.is_set():  # woken while the consumer held an item: read again at once
                    continue
                if heartbeat is None:
                    await wakeup.wait()
                    continue
                remaining = last_item + heartbeat - loop.time()
                if remaining <= 0:
                    yield Heartbeat(cursor)
                    last_item = loop.time()
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await wakeup.wait()
        finally:
            for waiting in stop_waits:
                waiting.cancel()
            self._leave(group, wakeup)

    def _join(self, loop: asyncio.AbstractEventLoop, wakeup: asyncio.Event) -> _LoopFollowers:
        with self._lock:
            group = self._loops.get(loop)
            if group is None:
                group = self._loops[loop] = _LoopFollowers(loop)
            group.wakeups.add(wakeup)
            return group

    def _leave(self, group: _LoopFollowers, wakeup: asyncio.Event) -> None:
        with self._lock:
            group.wakeups.discard(wakeup)
            if not group.wakeups and self._loops.get(group.loop) is group:
                del self._loops[group.loop]

    def _due_wakeups(self) -> list[_LoopFollowers]:
        """The loops without a wake-up on the way yet (call under the lock)."""
        due = [group for group in self._loops.values() if not group.scheduled]
        for group in due:
            group.scheduled = True
        return due

    def _schedule(self, due: list[_LoopFollowers]) -> None:
        for group in due:
            try:
                group.loop.call_soon_threadsafe(self._wake, group)
            except RuntimeError:  # the loop is closed; its followers are gone with it
                with self._lock:
                    if self._loops.get(group.loop) is group:
                        del self._loops[group.loop]

    def _wake(self, group: _LoopFollowers) -> None:
        """Set every follower's wake-up of one loop (runs on that loop)."""
        with self._lock:
            group.scheduled = False
        for wakeup in list(group.wakeups):
            wakeup.set()
