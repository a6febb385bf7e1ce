"""Ended jobs kept for WatchJob: oldest end first, within a time, a count and a byte limit.

Without the count and byte limits, the jobs that ended in the last ``seconds`` were all
kept, so memory grew with the request rate (issue 17: +17 % RSS over 100 calls when each
ended job still held its upload). Each limit evicts the job that ended first.
"""

from __future__ import annotations

import collections
import enum
import logging
from dataclasses import dataclass
from typing import Generic, TypeVar

from inference_service.metrics import InferenceMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EvictionReason(enum.StrEnum):
    EXPIRED = "expired"  # ended more than ``seconds`` ago
    COUNT_LIMIT = "count_limit"  # more than ``max_jobs`` ended jobs
    BYTES_LIMIT = "bytes_limit"  # the ended jobs' bytes above ``max_bytes``


@dataclass(frozen=True)
class RetentionLimits:
    """How long, how many and how many bytes of ended jobs stay watchable (0 for any: none kept)."""

    seconds: float = 600.0
    max_jobs: int = 1000
    max_bytes: int = 64 << 20

    def describe(self) -> str:
        return f"{self.seconds:g} s, {self.max_jobs} jobs, {self.max_bytes / (1 << 20):g} MiB"


@dataclass
class _Kept(Generic[T]):
    item: T
    since: float  # time.monotonic() when it entered retention
    nbytes: int


class RetainedJobs(Generic[T]):
    """Ended jobs in the order they ended, with their total bytes; keeps the metrics.

    Not thread-safe: its owner (JobManager) calls it under its own lock.
    """

    def __init__(self, limits: RetentionLimits, metrics: InferenceMetrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics
        self._kept: collections.OrderedDict[str, _Kept[T]] = collections.OrderedDict()
        self._bytes = 0
        if metrics is not None:
            for reason in EvictionReason:
                metrics.jobs_evicted.labels(reason.value)
        self._update_gauges()

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, job_id: str) -> T | None:
        kept = self._kept.get(job_id)
        return None if kept is None else kept.item

    def items(self) -> list[T]:
        return [kept.item for kept in self._kept.values()]

    def add(self, job_id: str, item: T, nbytes: int, now: float) -> list[tuple[str, EvictionReason]]:
        """Keep an ended job; returns the jobs evicted to stay within the limits (maybe this one)."""
        self._kept[job_id] = _Kept(item, now, nbytes)
        self._bytes += nbytes
        return self._evict(now)

    def expire(self, now: float) -> list[tuple[str, EvictionReason]]:
        """Evict what the limits no longer allow (the timer's sweep)."""
        return self._evict(now)

    def set_limits(self, limits: RetentionLimits, now: float) -> list[tuple[str, EvictionReason]]:
        self.limits = limits
        return self._evict(now)

    def _evict(self, now: float) -> list[tuple[str, EvictionReason]]:
        evicted: list[tuple[str, EvictionReason]] = []
        while self._kept:
            job_id, oldest = next(iter(self._kept.items()))
            reason = self._over(oldest, now)
            if reason is None:
                break
            del self._kept[job_id]
            self._bytes -= oldest.nbytes
            evicted.append((job_id, reason))
            if self.metrics is not None:
                self.metrics.jobs_evicted.labels(reason.value).inc()
        self._update_gauges()
        if evicted:
            logger.debug("ended jobs evicted", extra={"jobs": len(evicted), "reason": evicted[-1][1].value})
        return evicted

    def _over(self, oldest: _Kept[T], now: float) -> EvictionReason | None:
        """Why the oldest job must go, if it must: it expired, or the jobs exceed a limit."""
        limits = self.limits
        if now - oldest.since >= limits.seconds:
            return EvictionReason.EXPIRED
        if len(self._kept) > limits.max_jobs:
            return EvictionReason.COUNT_LIMIT
        if self._bytes > limits.max_bytes:
            return EvictionReason.BYTES_LIMIT
        return None

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.jobs_retained.set(len(self._kept))
            self.metrics.jobs_retained_bytes.set(self._bytes)
