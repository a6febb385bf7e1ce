"""The configured hub endpoints ("sources"): their names and order, and a circuit breaker each."""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from model_service.urls import display_url

logger = logging.getLogger(__name__)

OFFICIAL_ENDPOINT = "https://huggingface.co"
OFFICIAL_NAME = "official"
_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")

# Bounded values of the ``reason`` label of voxserve_source_failures_total.
FAILURE_KINDS = ("http_5xx", "http_4xx", "connection", "reset", "timeout", "integrity", "other")


@dataclass(frozen=True)
class Source:
    """A configured hub endpoint and the name a pull can choose it by."""

    name: str
    url: str


def parse_source(given: str) -> Source:
    """``name=URL`` or a plain URL (named ``official`` for the official hub, else its host)."""
    name, sep, rest = given.partition("=")
    if sep and "://" not in name:
        url = rest.strip().rstrip("/")
        name = name.strip()
        if not _SOURCE_NAME.fullmatch(name):
            raise ValueError(f"hub endpoint name {name!r} must be letters, digits, '_', '.', ':' or '-'")
    else:
        url = given.strip().rstrip("/")
        name = ""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"hub endpoint {display_url(url)!r} must start with http:// or https://")
    if not name:
        name = OFFICIAL_NAME if url == OFFICIAL_ENDPOINT else urllib.parse.urlsplit(display_url(url)).netloc
    return Source(name, url)


def default_sources(configured: Sequence[str], hf_endpoint: str | None) -> tuple[Source, ...]:
    """Configured endpoints (``name=URL`` or URL) in order; else HF_ENDPOINT (if set) then
    the official hub. A URL given twice counts once; two endpoints with one name are refused."""
    chosen = list(configured) if configured else [e for e in (hf_endpoint, OFFICIAL_ENDPOINT) if e]
    unique: list[Source] = []
    for given in chosen:
        source = parse_source(given)
        if any(s.url == source.url for s in unique):
            continue
        if any(s.name == source.name for s in unique):
            raise ValueError(f"two hub endpoints are named {source.name!r}; name them apart (name=URL)")
        unique.append(source)
    return tuple(unique)


class BreakerState(enum.StrEnum):
    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


@dataclass(frozen=True)
class SourceHealth:
    """What ListSources shows of one endpoint (wall-clock timestamps, None when never)."""

    name: str
    url: str
    last_success_at: float | None
    last_failure_at: float | None
    last_failure_reason: str
    consecutive_failures: int
    state: BreakerState
    retry_after_seconds: float


@dataclass
class _Breaker:
    source: Source
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0  # monotonic: when it opened, or when the half-open probe began
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_failure_reason: str = ""


class SourceObserver:
    """Told of every failure and breaker change (the metrics); the default does nothing."""

    def failure(self, source: str, kind: str) -> None:
        """One failed request to ``source``."""

    def state_changed(self, source: str, state: BreakerState) -> None:
        """The breaker of ``source`` moved to ``state``."""


class SourceBreakers:
    """A circuit breaker per endpoint: after ``threshold`` consecutive failed requests the
    endpoint is skipped for ``cooldown`` seconds (a dead mirror then costs a pull nothing
    instead of a timeout), then one half-open probe closes it again or reopens it.

    Thread safe; ``allow`` before a request, ``success`` / ``failure`` after it. A definitive
    not-found is an answer, not an outage: callers report it as neither.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        threshold: int = 3,
        cooldown: float = 30.0,
        observer: SourceObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._observer = observer or SourceObserver()
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers = {s.url: _Breaker(s) for s in sources}
        for source in sources:
            self._observer.state_changed(source.name, BreakerState.CLOSED)

    def allow(self, url: str) -> str:
        """ "" when a request to ``url`` may go out now, else why not (circuit open)."""
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None or breaker.state == BreakerState.CLOSED:
                return ""
            waited = self._clock() - breaker.opened_at
            if waited < self.cooldown:
                what = "open" if breaker.state == BreakerState.OPEN else "half-open, probe in flight"
                return (
                    f"circuit {what} after {breaker.failures} consecutive failures "
                    f"(last: {breaker.last_failure_reason}); retry in {self.cooldown - waited:.1f}s"
                )
            # Cool-down over (or a probe that never reported back): this request is the probe.
            breaker.opened_at = self._clock()
            self._move(breaker, BreakerState.HALF_OPEN)
            return ""

    def success(self, url: str) -> None:
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None:
                return
            breaker.failures = 0
            breaker.last_success_at = time.time()
            if breaker.state != BreakerState.CLOSED:
                self._move(breaker, BreakerState.CLOSED)

    def failure(self, url: str, kind: str, reason: str) -> None:
        with self._lock:
            breaker = self._breakers.get(url)
            if breaker is None:
                return
            breaker.failures += 1
            breaker.last_failure_at = time.time()
            breaker.last_failure_reason = reason
            self._observer.failure(breaker.source.name, kind if kind in FAILURE_KINDS else "other")
            if breaker.state == BreakerState.HALF_OPEN or (
                breaker.state == BreakerState.CLOSED and breaker.failures >= self.threshold
            ):
                breaker.opened_at = self._clock()
                self._move(breaker, BreakerState.OPEN)

    def _move(self, breaker: _Breaker, state: BreakerState) -> None:
        previous, breaker.state = breaker.state, state
        extra: dict[str, object] = {
            "source": breaker.source.name,
            "endpoint": breaker.source.url,
            "from_state": previous.value,
            "to_state": state.value,
            "consecutive_failures": breaker.failures,
        }
        if state == BreakerState.OPEN:
            extra["cooldown_seconds"] = self.cooldown
            extra["reason"] = breaker.last_failure_reason
            logger.warning("source circuit opened; skipping it during the cool-down", extra=extra)
        else:
            message = (
                "source circuit half-open: probing" if state == BreakerState.HALF_OPEN else "source circuit closed"
            )
            logger.info(message, extra=extra)
        self._observer.state_changed(breaker.source.name, state)

    def health(self) -> list[SourceHealth]:
        with self._lock:
            now = self._clock()
            return [
                SourceHealth(
                    name=b.source.name,
                    url=b.source.url,
                    last_success_at=b.last_success_at,
                    last_failure_at=b.last_failure_at,
                    last_failure_reason=b.last_failure_reason,
                    consecutive_failures=b.failures,
                    state=b.state,
                    retry_after_seconds=(
                        max(0.0, self.cooldown - (now - b.opened_at)) if b.state == BreakerState.OPEN else 0.0
                    ),
                )
                for b in self._breakers.values()
            ]
