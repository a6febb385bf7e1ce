"""The cache's memory watchdog: when the process or the device is too full, and the thread that checks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from inference_service.memory import MemoryProbe, is_cuda

logger = logging.getLogger(__name__)


def process_used(probe: MemoryProbe, device: str) -> int:
    """What the process holds where models live: RSS on CPU, device memory in use on CUDA."""
    if is_cuda(device):
        return probe.device_used_bytes(device)
    return probe.process_rss_bytes()


def memory_pressure(
    probe: MemoryProbe, device: str, *, baseline: int, budget: int, device_total: int, threshold: float
) -> dict[str, int] | None:
    """The figures that exceed the threshold, or None when memory is fine.

    "Exceed" means what the process has added since ``baseline`` passes threshold x the
    budget, or the whole device is fuller than threshold of its memory.
    """
    grown = process_used(probe, device) - baseline
    device_used = probe.device_used_bytes(device)
    if grown > threshold * budget or device_used > threshold * device_total:
        return {
            "process_growth_bytes": grown,
            "growth_limit_bytes": int(threshold * budget),
            "device_used_bytes": device_used,
            "device_limit_bytes": int(threshold * device_total),
        }
    return None


class MemoryWatchdog:
    """Runs ``check`` every ``interval`` seconds in a daemon thread until stop(); a failing
    check is logged and the next one still runs."""

    def __init__(self, interval: float, check: Callable[[], object]) -> None:
        self.interval = interval  # read before each wait: a change applies from the next check
        self._check = check
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="model-cache-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._check()
            except Exception:
                logger.exception("memory watchdog check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
