"""Byte counts, speed and PROGRESS events of one running download."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from model_service.events import EventBus, EventType, StoreEvent
from model_service.metrics import ModelStoreMetrics
from model_service.state import ModelState
from model_service.urls import display_url

logger = logging.getLogger(__name__)

# The speed is the slope over the last few seconds: long enough to smooth per-read
# jitter, short enough that a throttled or resumed transfer shows up within one window.
SPEED_WINDOW_SECONDS = 3.0


@dataclass
class DownloadProgress:
    """Byte counts and a sliding-window speed; written by the download thread only."""

    bytes_total: int
    bytes_done: int
    files_total: int
    files_done: int = 0
    current_file: str = ""
    source: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)
    # VERIFYING: bytes re-hashed so far and bytes to re-hash (files hashed while they
    # were written are in neither).
    verify_bytes_done: int = 0
    verify_bytes_total: int = 0

    def add(self, count: int) -> None:
        self.bytes_done += count
        now = time.monotonic()
        self.samples.append((now, self.bytes_done))
        cutoff = now - SPEED_WINDOW_SECONDS
        while len(self.samples) > 2 and self.samples[0][0] < cutoff:
            self.samples.pop(0)

    @property
    def speed(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return max(0.0, (b1 - b0) / (t1 - t0)) if t1 > t0 else 0.0

    @property
    def eta(self) -> float:
        speed = self.speed
        return (self.bytes_total - self.bytes_done) / speed if speed > 0 else 0.0


class ProgressReporter:
    """The callbacks FileDownloader calls for one download: counts bytes per source in the
    metrics and publishes PROGRESS events no faster than the bus lets them out."""

    def __init__(self, model_id: str, progress: DownloadProgress, bus: EventBus, metrics: ModelStoreMetrics) -> None:
        self.model_id = model_id
        self.progress = progress
        self._bus = bus
        self._metrics = metrics
        self._byte_counters: dict[str, Any] = {}
        self._last_published = 0.0

    def on_bytes(self, count: int, endpoint: str) -> None:
        """Called per network read (negative when a source ignored Range and restarted)."""
        self.progress.add(count)
        self.progress.source = endpoint
        if count > 0:
            counter = self._byte_counters.get(endpoint)
            if counter is None:
                label = display_url(endpoint)  # no user:password@ in a metric label
                counter = self._byte_counters[endpoint] = self._metrics.download_bytes.labels(self.model_id, label)
            counter.inc(count)
        self.publish()

    def on_source_failed(self, endpoint: str, reason: str) -> None:
        logger.warning(
            "source failed for a file; falling back",
            extra={"endpoint": endpoint, "reason": reason, "file": self.progress.current_file},
        )

    def on_verify_failed(self, reason: str) -> None:
        self._metrics.verification_failures.labels(self.model_id).inc()
        logger.error("verification failed", extra={"problem": reason})

    def start_file(self, path: str) -> None:
        """A new file: its first PROGRESS event goes out whatever the rate limit says."""
        self.progress.current_file = path
        self.publish(force=True)

    def file_done(self) -> None:
        self.progress.files_done += 1

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_published < self._bus.progress_interval:
            return  # the bus would drop it anyway; skip building it (called per network read)
        self._last_published = now
        progress = self.progress
        speed = progress.speed
        self._metrics.download_speed.labels(self.model_id).set(speed)
        event = StoreEvent(
            0,
            self.model_id,
            EventType.PROGRESS,
            ModelState.DOWNLOADING,
            time.time(),
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            bytes_per_second=speed,
            eta_seconds=progress.eta,
            files_done=progress.files_done,
            files_total=progress.files_total,
            current_file=progress.current_file,
            source=progress.source,
        )
        if force:
            self._bus.allow_next_progress(self.model_id)
        self._bus.publish(event)


class VerifyReporter:
    """VERIFYING progress of one model while its files are hashed: PROGRESS events with
    verify_bytes_done/verify_bytes_total, no faster than the bus lets them out; the
    transfer counts (bytes_done/bytes_total, files) stay as ``progress`` has them."""

    def __init__(self, model_id: str, progress: DownloadProgress, bus: EventBus) -> None:
        self.model_id = model_id
        self.progress = progress
        self._bus = bus
        self._last_published = 0.0

    def start(self, verify_bytes_total: int) -> None:
        self.progress.verify_bytes_done = 0
        self.progress.verify_bytes_total = verify_bytes_total

    def on_bytes(self, count: int) -> None:
        """Called per block hashed."""
        self.progress.verify_bytes_done += count
        self.publish()

    def file(self, path: str) -> None:
        self.progress.current_file = path

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_published < self._bus.progress_interval:
            return
        self._last_published = now
        progress = self.progress
        event = StoreEvent(
            0,
            self.model_id,
            EventType.PROGRESS,
            ModelState.VERIFYING,
            time.time(),
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            files_done=progress.files_done,
            files_total=progress.files_total,
            current_file=progress.current_file,
            source=progress.source,
            verify_bytes_done=progress.verify_bytes_done,
            verify_bytes_total=progress.verify_bytes_total,
        )
        if force:
            self._bus.allow_next_progress(self.model_id)
        self._bus.publish(event)
