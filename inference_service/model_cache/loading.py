"""Getting a cold model ready: one shared load per model (Flight), built alone under the load lock and measured."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from inference_service.memory import MemoryProbe, is_cuda, low_mmap_threshold
from inference_service.model_cache.cache_types import (
    Lease,
    LoadedModel,
    LoadProgress,
    ModelSpec,
    ProgressCallback,
    kind_accepted,
)
from inference_service.model_cache.policy import footprint_floor
from inference_service.warmup import Warmup, warm_up
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)


@dataclass
class Participant:
    """One acquire waiting on a flight; ``lease`` is set (by CacheState, under its lock) when the
    model lands, before the flight's future resolves, if this acquire accepts the model's kind."""

    expected_kind: str | None
    lease: Lease | None = None


@dataclass(frozen=True)
class FlightResult:
    spec: ModelSpec
    load_seconds: float  # 0.0 when nothing was loaded: no participant wanted this kind


class Flight:
    """One resolve+load of a model that every concurrent acquire of it waits on ("singleflight").

    Its participants are CacheState's (changed under the state's lock); its own lock guards only
    the progress listeners.
    """

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.future: Future[FlightResult] = Future()
        self._participants: list[Participant] = []
        self._listeners: list[ProgressCallback] = []
        self._last: LoadProgress | None = None
        self._lock = threading.Lock()

    def join(self, expected_kind: str | None) -> Participant:
        """Add one acquire (call with the cache state's lock)."""
        participant = Participant(expected_kind)
        self._participants.append(participant)
        return participant

    def wanted_by(self, kind: ModelKind) -> list[Participant]:
        """The participants that accept a model of this kind (call with the cache state's lock)."""
        return [p for p in self._participants if kind_accepted(p.expected_kind, kind)]

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


def _notify(callback: ProgressCallback, event: LoadProgress) -> None:
    try:
        callback(event)
    except Exception:  # one broken listener must not fail the load others wait on
        logger.exception("progress callback failed", extra={"model_id": event.model_id})


@dataclass(frozen=True)
class Measured:
    model: LoadedModel
    seconds: float  # the whole load, warm-up included (what the load-duration metric observes)
    memory_bytes: int
    estimate: int
    warmup_seconds: float | None = None  # None: no warm-up ran


# An evicted model on its way out: (model_id, model), detached from its entry by CacheState.
Closing = tuple[str, LoadedModel]


class ModelLoader:
    """Builds models one at a time under the load lock, so that each one's memory can be measured
    (RSS delta on CPU, allocated device memory on CUDA), and closes evicted models under the same
    lock, so that no measurement counts a model being freed.

    ``load(spec)`` is the engines' loader (inference_service/engines/loaders.py in the service,
    a fake in tests); ``warmup`` is a reloadable setting, read at each load.
    """

    def __init__(self, load: Callable[[ModelSpec], LoadedModel], probe: MemoryProbe, device: str, warmup: bool) -> None:
        self._load = load
        self._probe = probe
        self._device = device
        self._cuda = is_cuda(device)
        self._lock = threading.RLock()  # re-entered: making room frees models inside a load
        self.warmup = warmup

    def load(self, spec: ModelSpec, make_room: Callable[[], int], report: ProgressCallback) -> Measured:
        """Make room (``make_room`` evicts and returns the estimate), then build the model alone,
        measuring the memory the load adds; the warm-up runs after the measurement."""
        with self._lock:
            estimate = make_room()
            report(LoadProgress(spec.model_id, "loading", message=f"loading {spec.kind} model from {spec.path}"))
            # No gc.collect() here: with torch imported a full collection costs ~100 ms,
            # and free() already collects whenever models are dropped.
            with low_mmap_threshold():
                self._probe.return_freed_memory(self._device)
                before = self._measure()
                started = time.perf_counter()
                model = self._load(spec)
                seconds = time.perf_counter() - started
                # A load's transient buffers (file reads, weight conversion) are freed but stay
                # resident in glibc's arenas: without a trim they were counted as the model's
                # footprint, by an amount that depends on the process's allocation history
                # (tiny.en int8: 51 MiB after the trim, 66-91 MiB before, up to 226 MiB seen).
                self._probe.return_freed_memory(self._device)
                after = self._measure()
            # Measured before the warm-up: the footprint is the model's, as before warm-up existed.
            warmed = self._warm_up(model) if self.warmup else None
        if warmed is not None:
            seconds += warmed.seconds
        warmup_seconds = warmed.seconds if warmed is not None else None
        return Measured(model, seconds, max(after - before, footprint_floor(spec)), estimate, warmup_seconds)

    def free(self, closing: list[Closing]) -> None:
        """Close evicted models and give their memory back to the OS / driver.

        Takes the models out of ``closing`` one by one, so that nothing holds them when the
        collector runs.
        """
        if not closing:
            return
        with self._lock:
            while closing:
                model_id, model = closing.pop(0)
                try:
                    model.close()
                except Exception:
                    logger.exception("closing model failed", extra={"model_id": model_id})
                del model
            gc.collect()
            self._probe.return_freed_memory(self._device)

    def process_used(self) -> int:
        """What the process holds where models live: RSS on CPU, device memory in use on CUDA."""
        if self._cuda:
            return self._probe.device_used_bytes(self._device)
        return self._probe.process_rss_bytes()

    def _measure(self) -> int:
        if self._cuda:
            # CTranslate2 allocates outside torch's allocator; the device-wide figure sees it.
            return max(self._probe.cuda_allocated_bytes(self._device), self._probe.device_used_bytes(self._device))
        return self._probe.process_rss_bytes()

    def _warm_up(self, model: LoadedModel) -> Warmup | None:
        """One decode of silence before the model serves (inference_service/warmup.py); the
        model is closed when it fails, and the load fails with it."""
        try:
            return warm_up(model)
        except BaseException:
            model.close()
            raise
