"""The cache's watchdog: evicts idle models while the process or the device is too full, and unloads
models nobody used for model_idle_ttl_seconds."""

from __future__ import annotations

import gc
import logging
import threading

from inference_service.memory import MemoryProbe
from inference_service.model_cache.cache_types import CacheConfig
from inference_service.model_cache.loading import ModelLoader
from inference_service.model_cache.policy import memory_pressure
from inference_service.model_cache.state import CacheState
from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)


class MemoryWatchdog:
    """Evicts idle, unpinned models (least recently used first) while memory is over the threshold,
    once per ``check_once()``, or every watchdog_interval_seconds in a daemon thread from ``start()``
    until ``stop()``; a failing check is logged and the next one still runs.

    The same thread unloads the idle, unpinned models nobody used for the config's
    idle_ttl_seconds (``expire_idle_once``), checking at least every quarter of the TTL, so a
    model leaves between TTL and 1.25 x TTL after its last use. On CUDA this thread never
    allocates device memory, so CTranslate2's per-thread caching allocator frees the weights it
    drops straight back to the driver (engines/whisper.py's close() clears the workers' caches).

    The threshold, the interval and the TTL are the config's, read at each check and each wait
    (``set`` changes them); the baseline is what the process held when the watchdog was made.
    """

    def __init__(
        self, config: CacheConfig, state: CacheState, loader: ModelLoader, probe: MemoryProbe, device_total: int
    ) -> None:
        self._config = config
        self._state = state
        self._loader = loader
        self._probe = probe
        self._device_total = device_total
        gc.collect()
        probe.return_freed_memory(config.device)
        self._baseline = loader.process_used()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a setting changed (or stop): wait again with the new values

    def check_once(self) -> list[str]:
        """Evict while "over": what the process has added since the baseline (RSS on CPU, device
        memory in use on CUDA) exceeds watchdog_threshold x the budget, or the whole device is
        fuller than watchdog_threshold of its memory. Returns the evicted ids."""
        evicted: list[str] = []
        while (pressure := self._pressure()) is not None:
            logger.debug("memory over the watchdog threshold", extra=pressure)
            victim = self._state.evict_idle()
            if victim is None:
                logger.warning("memory over the watchdog threshold and no model can be evicted", extra=pressure)
                break
            evicted.append(victim)
        return evicted

    def _pressure(self) -> dict[str, int] | None:
        return memory_pressure(
            self._loader.process_used() - self._baseline,
            self._probe.device_used_bytes(self._config.device),
            budget=self._state.budget,
            device_total=self._device_total,
            threshold=self._config.watchdog_threshold,
        )

    def expire_idle_once(self) -> list[str]:
        """Unload the idle, unpinned models nobody used for idle_ttl_seconds; returns their ids."""
        return self._state.expire_idle(self._config.idle_ttl_seconds)

    def set(
        self, threshold: float | None, interval_seconds: float | None, idle_ttl_seconds: float | None = None
    ) -> None:
        """Change the threshold, the interval and/or the idle TTL (None = unchanged);
        InvalidArgument naming the setting for a value out of range (nothing changes then)."""
        if threshold is not None and not 0 < threshold <= 1:
            raise InvalidArgument(f"watchdog_threshold must be in (0, 1], not {threshold}")
        if interval_seconds is not None and not interval_seconds > 0:
            raise InvalidArgument(f"watchdog_interval_seconds must be positive, not {interval_seconds}")
        if idle_ttl_seconds is not None and not idle_ttl_seconds >= 0:
            raise InvalidArgument(f"model_idle_ttl_seconds must be >= 0 (0 = never), not {idle_ttl_seconds}")
        if threshold is not None:
            self._config.watchdog_threshold = threshold
        if interval_seconds is not None:
            self._config.watchdog_interval_seconds = interval_seconds
        if idle_ttl_seconds is not None:
            self._config.idle_ttl_seconds = idle_ttl_seconds
        self._wake.set()

    def _wait_seconds(self) -> float:
        interval = self._config.watchdog_interval_seconds
        ttl = self._config.idle_ttl_seconds
        return min(interval, max(ttl / 4, 0.05)) if ttl > 0 else interval

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._watch, name="model-cache-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._wake.wait(self._wait_seconds()):
                self._wake.clear()  # new settings: wait again with them
                continue
            try:
                self.check_once()
            except Exception:
                logger.exception("memory watchdog check failed")
            try:
                self.expire_idle_once()
            except Exception:
                logger.exception("idle model check failed")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
