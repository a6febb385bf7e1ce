"""Server-wide event sequence with bounded history, listeners and progress rate limiting."""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from model_service.state import ModelState


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


Listener = Callable[[], None]


class EventBus:
    """Assigns sequences, keeps the last ``history_size`` events, wakes listeners.

    Listeners are cheap wake-up callbacks; they read ``events_after`` themselves, so a
    slow consumer never blocks publishers and one that falls out of history resyncs.
    """

    def __init__(self, history_size: int = 10_000, progress_interval: float = 0.1, first_sequence: int = 0) -> None:
        self._lock = threading.Lock()
        self._history: collections.deque[StoreEvent] = collections.deque(maxlen=history_size)
        self._sequence = first_sequence
        self._listeners: set[Listener] = set()
        self._progress_interval = progress_interval
        self._last_progress: dict[str, float] = {}

    @property
    def progress_interval(self) -> float:
        """Minimum seconds between two PROGRESS events of one model."""
        return self._progress_interval

    @property
    def sequence(self) -> int:
        return self._sequence

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
            self._sequence += 1
            stamped = replace(event, sequence=self._sequence)
            self._history.append(stamped)
            listeners = list(self._listeners)
        for listener in listeners:
            listener()
        return stamped

    def events_after(self, sequence: int) -> list[StoreEvent] | None:
        """Events with sequence > ``sequence``; None when some of them left the history
        (or the sequence is from the future, e.g. another server incarnation)."""
        with self._lock:
            if sequence > self._sequence:
                return None
            if sequence == self._sequence:
                return []
            if not self._history or self._history[0].sequence > sequence + 1:
                return None
            count = self._sequence - sequence
            history = self._history
            return [history[-i] for i in range(count, 0, -1)]

    def allow_next_progress(self, model_id: str) -> None:
        """Let the next PROGRESS event of model_id through the rate limit (a new file)."""
        with self._lock:
            self._last_progress.pop(model_id, None)

    def history(self) -> list[StoreEvent]:
        """Every event still in the bounded history, oldest first."""
        with self._lock:
            return list(self._history)

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.add(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    @property
    def listener_count(self) -> int:
        return len(self._listeners)
