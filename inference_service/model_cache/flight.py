"""One shared resolve+load per cold model ("singleflight"): the load every concurrent acquire waits on."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from inference_service.errors import WrongModelKind
from inference_service.model_cache.cache_types import CacheEntry, LoadProgress, ModelSpec, ProgressCallback
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlightResult:
    spec: ModelSpec
    entry: CacheEntry | None  # None: no participant wanted this kind, nothing was loaded
    load_seconds: float


class Flight:
    """One resolve+load of a model that every concurrent acquire of it waits on."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.future: Future[FlightResult] = Future()
        self.expected_kinds: list[str | None] = []  # one per participant; guarded by the cache lock
        self._listeners: list[ProgressCallback] = []
        self._last: LoadProgress | None = None
        self._lock = threading.Lock()

    def listen(self, callback: ProgressCallback) -> None:
        with self._lock:
            self._listeners.append(callback)
            last = self._last
        if last is not None:  # a late joiner first sees where the load is
            _notify(callback, last)

    def report(self, event: LoadProgress) -> None:
        with self._lock:
            self._last = event
            listeners = list(self._listeners)
        for callback in listeners:
            _notify(callback, event)

    def wanted_by(self, kind: ModelKind) -> int:
        """How many participants accept a model of this kind (call with the cache lock)."""
        return sum(1 for expected in self.expected_kinds if kind_accepted(expected, kind))


def _notify(callback: ProgressCallback, event: LoadProgress) -> None:
    try:
        callback(event)
    except Exception:  # one broken listener must not fail the load others wait on
        logger.exception("progress callback failed", extra={"model_id": event.model_id})


def kind_accepted(expected_kind: str | None, kind: ModelKind) -> bool:
    return expected_kind is None or expected_kind == kind


def wrong_kind(model_id: str, kind: ModelKind, expected_kind: str | None) -> WrongModelKind:
    return WrongModelKind(f"model {model_id!r} is a {kind} model, but this request needs a {expected_kind} model")
