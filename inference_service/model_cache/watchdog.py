"""The cache's memory watchdog: evicts idle models while the process or the device is too full."""

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

    The threshold and the interval are the config's, read at each check and each wait (``set``
    changes them); the baseline is what the process held when the watchdog was made.
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

    def set(self, threshold: float | None, interval_seconds: float | None) -> None:
        """Change the threshold and/or the interval (None = unchanged); InvalidArgument naming
        the setting for a value out of range (nothing changes then)."""
        if threshold is not None and not 0 < threshold <= 1:
            raise InvalidArgument(f"watchdog_threshold must be in (0, 1], not {threshold}")
        if interval_seconds is not None and not interval_seconds > 0:
            raise InvalidArgument(f"watchdog_interval_seconds must be positive, not {interval_seconds}")
        if threshold is not None:
            self._config.watchdog_threshold = threshold
        if interval_seconds is not None:
            self._config.watchdog_interval_seconds = interval_seconds

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="model-cache-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self._config.watchdog_interval_seconds):
            try:
                self.check_once()
            except Exception:
                logger.exception("memory watchdog check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
