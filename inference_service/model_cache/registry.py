"""The cache's state under one lock: loaded entries in LRU order, loads in flight, counters and gauges."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections import OrderedDict

from inference_service.memory import MemoryProbe, is_cuda
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache.cache_types import CacheEntry, CacheStats, LoadedModel, LoadedModelInfo
from inference_service.model_cache.eviction import EVICTION_REASONS
from inference_service.model_cache.flight import Flight, kind_accepted, wrong_kind
from inference_service.model_cache.reservations import Reservations

logger = logging.getLogger(__name__)


class CacheRegistry:
    """What the cache knows, changed only with ``lock`` held (methods ending in _locked).

    ``load_lock`` is held around each load (to measure it alone) and around freeing models.
    ``budget`` and ``max_models`` are the limits in force (``set_limits_locked`` changes them).
    """

    def __init__(
        self, probe: MemoryProbe, device: str, budget: int, max_models: int, metrics: InferenceMetrics | None
    ) -> None:
        self.lock = threading.Lock()
        self.load_lock = threading.RLock()
        self.entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self.flights: dict[str, Flight] = {}
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.load_failures = 0
        self.evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self.reservations = Reservations()  # memory held outside models (live streams), counted as used
        self.metrics = metrics
        self._probe = probe
        self._device = device
        self._device_type = "cuda" if is_cuda(device) else "cpu"
        self.budget = budget
        self.max_models = max_models
        if metrics is not None:
            metrics.memory_budget_bytes.labels(self._device_type).set(budget)
            metrics.memory_used_bytes.labels(self._device_type).set(0)
            metrics.loaded_models.set(0)

    def set_limits_locked(self, max_models: int, budget: int) -> None:
        """New limits in force from now on (eviction to meet them is the caller's)."""
        self.max_models = max_models
        self.budget = budget
        if self.metrics is not None:
            self.metrics.memory_budget_bytes.labels(self._device_type).set(budget)

    def hit_locked(self, entry: CacheEntry, expected_kind: str | None) -> LoadedModel:
        """Take one more reference on a loaded entry and mark it most recently used."""
        if not kind_accepted(expected_kind, entry.kind):
            raise wrong_kind(entry.model_id, entry.kind, expected_kind)
        assert entry.model is not None
        entry.refcount += 1
        entry.hits += 1
        entry.last_used = time.time()
        self.entries.move_to_end(entry.model_id)
        self.hits += 1
        logger.debug("model cache hit", extra={"model_id": entry.model_id, "in_use": entry.refcount})
        if self.metrics is not None:
            self.metrics.cache_hits.labels(entry.model_id).inc()
        return entry.model

    def evict_locked(self, entry: CacheEntry, reason: str) -> None:
        del self.entries[entry.model_id]
        self.evictions[reason] += 1
        logger.info(
            "model evicted",
            extra={
                "model_id": entry.model_id,
                "reason": reason,
                "memory_bytes": entry.memory_bytes,
                "in_use": entry.refcount,
            },
        )
        if self.metrics is not None:
            self.metrics.cache_evictions.labels(entry.model_id, reason).inc()
            with contextlib.suppress(KeyError):
                self.metrics.loaded_model_bytes.remove(entry.model_id)
        self.update_gauges_locked()

    def free(self, entries: list[CacheEntry]) -> None:
        """Close evicted models and give their memory back to the OS / driver (without the lock)."""
        if not entries:
            return
        with self.load_lock:
            for entry in entries:
                model, entry.model = entry.model, None
                if model is None:
                    continue
                try:
                    model.close()
                except Exception:
                    logger.exception("closing model failed", extra={"model_id": entry.model_id})
                del model
            gc.collect()
            self._probe.return_freed_memory(self._device)

    def used_locked(self) -> int:
        return sum(e.memory_bytes for e in self.entries.values()) + self.reservations.total

    def room_locked(self) -> int:
        """The budget left for models once the reservations are counted."""
        return self.budget - self.reservations.total

    def update_gauges_locked(self) -> None:
        if self.metrics is None:
            return
        self.metrics.loaded_models.set(len(self.entries))
        self.metrics.memory_used_bytes.labels(self._device_type).set(self.used_locked())
        for entry in self.entries.values():
            self.metrics.loaded_model_bytes.labels(entry.model_id).set(entry.memory_bytes)

    def loaded(self) -> list[LoadedModelInfo]:
        with self.lock:
            return [e.info() for e in self.entries.values()]

    def stats(self) -> CacheStats:
        with self.lock:
            return self.stats_locked()

    def stats_locked(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            evictions=sum(self.evictions.values()),
            loads=self.loads,
            load_failures=self.load_failures,
            memory_used_bytes=self.used_locked(),
            memory_budget_bytes=self.budget,
            max_models=self.max_models,
            evictions_by_reason=dict(self.evictions),
            loaded_models=len(self.entries),
        )
