"""The store's events: server-wide sequence with bounded history (an EventLog) and progress rate limiting."""

from __future__ import annotations

import asyncio
import enum
import threading
import time
from collections.abc import AsyncGenerator, Collection, Sequence
from dataclasses import dataclass, replace

from model_service.state import ModelState
from voxserve_common.eventlog import EventLog, Followed


class EventType(enum.StrEnum):
    SNAPSHOT = "SNAPSHOT"
    SNAPSHOT_END = "SNAPSHOT_END"
    STATE_CHANGED = "STATE_CHANGED"
    PROGRESS = "PROGRESS"
    HEARTBEAT = "HEARTBEAT"


@dataclass(frozen=True)
class StoreEvent:
    """One thing that happened to a model; ``sequence`` orders all events of the server."""

    sequence: int
    model_id: str
    type: EventType
    state: ModelState
    timestamp: float
    bytes_done: int = 0
    bytes_total: int = 0
    bytes_per_second: float = 0.0
    eta_seconds: float = 0.0
    files_done: int = 0
    files_total: int = 0
    current_file: str = ""
    source: str = ""
    queue_position: int = 0
    message: str = ""
    # VERIFYING only: bytes hashed so far / bytes to hash (files re-hashed, not those
    # hashed while they were written); bytes_done/bytes_total keep the transfer totals.
    verify_bytes_done: int = 0
    verify_bytes_total: int = 0


class EventBus:
    """The store's event log: server-wide sequences, bounded history, PROGRESS rate limit.

    Followers read the log themselves (``follow``), so a slow consumer never blocks a
    publisher and one that falls out of history resyncs.
    """

    def __init__(self, history_size: int = 10_000, progress_interval: float = 0.1, first_sequence: int = 0) -> None:
        self._lock = threading.Lock()
        self._log: EventLog[StoreEvent] = EventLog(history_size, first_sequence)
        self._progress_interval = progress_interval
        self._last_progress: dict[str, float] = {}

    @property
    def progress_interval(self) -> float:
        """Minimum seconds between two PROGRESS events of one model."""
        return self._progress_interval

    @progress_interval.setter
    def progress_interval(self, seconds: float) -> None:
        """A new rate limit (SIGHUP), in force from the next PROGRESS event."""
        with self._lock:
            self._progress_interval = seconds

    @property
    def sequence(self) -> int:
        return self._log.sequence

    def publish(self, event: StoreEvent) -> StoreEvent | None:
        """Stamp the event with the next sequence and record it; PROGRESS events of a
        model closer than the interval to the previous one are dropped (returns None)."""
        with self._lock:
            if event.type == EventType.PROGRESS:
                now = time.monotonic()
                last = self._last_progress.get(event.model_id, 0.0)
                if now - last < self._progress_interval:
                    return None
                self._last_progress[event.model_id] = now
            elif event.type == EventType.STATE_CHANGED:
                self._last_progress.pop(event.model_id, None)
            return self._log.append(lambda sequence: replace(event, sequence=sequence))

    def events_after(self, sequence: int) -> list[StoreEvent] | None:
        """Events with sequence > ``sequence``; None when some of them left the history
        (or the sequence is from the future, e.g. another server incarnation)."""
        return self._log.events_after(sequence)

    def follow(
        self,
        after_sequence: int,
        *,
        model_ids: Collection[str] = (),
        types: Collection[EventType] = (),
        heartbeat: float | None = None,
        stop: Sequence[asyncio.Event] = (),
    ) -> AsyncGenerator[Followed[StoreEvent], None]:
        """EventLog.follow over the store's events, only those of ``model_ids`` and of
        ``types`` if given (filtered events still move the follower's position)."""
        wanted, kinds = frozenset(model_ids), frozenset(types)

        def keep(event: StoreEvent) -> bool:
            return (not wanted or event.model_id in wanted) and (not kinds or event.type in kinds)

        return self._log.follow(
            after_sequence, filter=keep if wanted or kinds else None, heartbeat=heartbeat, stop=stop
        )

    def allow_next_progress(self, model_id: str) -> None:
        """Let the next PROGRESS event of model_id through the rate limit (a new file)."""
        with self._lock:
            self._last_progress.pop(model_id, None)

    def history(self) -> list[StoreEvent]:
        """Every event still in the bounded history, oldest first."""
        return self._log.history()

    @property
    def listener_count(self) -> int:
        """Event loops woken per burst of events (one for every stream of a server)."""
        return self._log.loop_count

    @property
    def follower_count(self) -> int:
        """Streams following the events now."""
        return self._log.follower_count
