"""Getting a cold model ready: resolve it, make room, load it alone and measure what it added."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from inference_service.errors import ModelLoadFailed
from inference_service.memory import MemoryProbe, format_bytes, is_cuda
from inference_service.model_cache.cache_types import (
    UNKNOWN_MODEL_LABEL,
    CacheConfig,
    CacheEntry,
    LoadedModel,
    LoadProgress,
    ModelSpec,
    ProgressCallback,
)
from inference_service.model_cache.eviction import plan_room
from inference_service.model_cache.flight import Flight, FlightResult
from inference_service.model_cache.footprint import MIN_MODEL_BYTES, Footprints
from inference_service.model_cache.limits import over_limits
from inference_service.model_cache.registry import CacheRegistry
from inference_service.warmup import Warmup, warm_up
from voxserve_common.errors import NotFound, VoxserveError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Measured:
    model: LoadedModel
    seconds: float  # the whole load, warm-up included (what the load-duration metric observes)
    memory_bytes: int
    estimate: int
    warmup_seconds: float | None = None  # None: no warm-up ran


class FlightLoader:
    """Runs a flight: resolve, evict to make room, load under the load lock (one load at a
    time so that each one's memory can be measured), then hand the entry to every participant."""

    def __init__(
        self,
        registry: CacheRegistry,
        resolve: Callable[[str, ProgressCallback | None], ModelSpec],
        load: Callable[[ModelSpec], LoadedModel],
        probe: MemoryProbe,
        config: CacheConfig,
    ) -> None:
        self._reg = registry
        self._lock = registry.lock
        self._resolve = resolve
        self._load = load
        self._metrics = registry.metrics
        self._probe = probe
        self._config = config
        self._device = config.device
        self._device_type = "cuda" if is_cuda(config.device) else "cpu"
        self._footprints = Footprints()
        self.warmup = config.warmup  # a live setting: read at each load

    def run(self, flight: Flight) -> None:
        """Resolve and load for every participant of the flight; never raises."""
        model_id = flight.model_id
        stage = "resolving"
        try:
            spec = self._resolve(model_id, flight.report)
            with self._lock:
                if not flight.wanted_by(spec.kind):
                    del self._reg.flights[model_id]
                    flight.future.set_result(FlightResult(spec, None, 0.0))
                    return
            stage = "loading"
            self._load_for(flight, spec)
        except BaseException as exc:
            if flight.future.done():  # failed after the model was handed out: the load stands
                logger.exception("model cache bookkeeping failed after a load", extra={"model_id": model_id})
                if not isinstance(exc, Exception):
                    raise
                return
            self._fail(flight, stage, exc)
            if not isinstance(exc, Exception):
                raise

    def _fail(self, flight: Flight, stage: str, exc: BaseException) -> None:
        model_id = flight.model_id
        failure: BaseException = exc
        if isinstance(exc, Exception) and not isinstance(exc, VoxserveError):
            failure = ModelLoadFailed(f"{stage} model {model_id!r} failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
        with self._lock:
            self._reg.flights.pop(model_id, None)
            self._reg.load_failures += 1
        logger.warning(
            "model load failed", extra={"model_id": model_id, "stage": stage, "error": str(failure)}, exc_info=exc
        )
        if self._metrics is not None:
            label = UNKNOWN_MODEL_LABEL if isinstance(failure, NotFound) else model_id
            self._metrics.model_loads.labels(label, "error").inc()
        flight.future.set_exception(failure)

    def _load_for(self, flight: Flight, spec: ModelSpec) -> None:
        model_id = flight.model_id
        loaded = self._load_measured(flight, spec)
        flight.report(
            LoadProgress(
                model_id, "loaded", message=f"loaded in {loaded.seconds:.2f} s, {format_bytes(loaded.memory_bytes)}"
            )
        )
        now = time.time()
        entry = CacheEntry(
            spec=spec,
            model=loaded.model,
            kind=spec.kind,
            device=str(getattr(loaded.model, "device", self._device)),
            compute_type=str(getattr(loaded.model, "compute_type", "")),
            memory_bytes=loaded.memory_bytes,
            loaded_at=now,
            last_used=now,
            pinned=model_id in self._config.pinned,
        )
        with self._lock:
            entry.refcount = flight.wanted_by(spec.kind)
            self._reg.entries[model_id] = entry
            del self._reg.flights[model_id]
            self._footprints.remember(spec, loaded.memory_bytes)
            self._reg.loads += 1
            # The measurement may exceed the estimate, and SetCacheLimits may have lowered the
            # limits during the load: trim idle models to the limits in force again.
            plan = over_limits(list(self._reg.entries.values()), self._reg.max_models, self._reg.room_locked())
            for victim, reason in plan:
                self._reg.evict_locked(victim, reason)
            over = [victim for victim, _ in plan]
            used = self._reg.used_locked()
            self._reg.update_gauges_locked()
            flight.future.set_result(FlightResult(spec, entry, loaded.seconds))
        self._report_load(spec, loaded, used)
        self._reg.free(over)

    def _load_measured(self, flight: Flight, spec: ModelSpec) -> _Measured:
        """Make room, then load alone under the load lock, measuring the memory the load adds."""
        with self._reg.load_lock:
            estimate = self.estimate_bytes(spec)
            with self._lock:
                plan = plan_room(
                    list(self._reg.entries.values()), spec, estimate, self._reg.max_models, self._reg.room_locked()
                )
                for entry, reason in plan:
                    self._reg.evict_locked(entry, reason)
            self._reg.free([entry for entry, _ in plan])
            flight.report(LoadProgress(spec.model_id, "loading", message=f"loading {spec.kind} model from {spec.path}"))
            # No gc.collect() here: with torch imported a full collection costs ~100 ms,
            # and CacheRegistry.free() already collects whenever models are dropped.
            self._probe.return_freed_memory(self._device)
            before = self._load_measure()
            started = time.perf_counter()
            model = self._load(spec)
            seconds = time.perf_counter() - started
            # A load's transient buffers (file reads, weight conversion) are freed but stay
            # resident in glibc's arenas: without a trim they were counted as the model's
            # footprint, by an amount that depends on the process's allocation history
            # (tiny.en int8: 51 MiB after the trim, 66-91 MiB before, up to 226 MiB seen).
            self._probe.return_freed_memory(self._device)
            after = self._load_measure()
            # Measured before the warm-up: the footprint is the model's, as before warm-up existed.
            warmed = self._warm_up(model) if self.warmup else None
        if warmed is not None:
            seconds += warmed.seconds
        warmup_seconds = warmed.seconds if warmed is not None else None
        return _Measured(model, seconds, max(after - before, MIN_MODEL_BYTES), estimate, warmup_seconds)

    def _warm_up(self, model: LoadedModel) -> Warmup | None:
        """One decode of silence before the model serves (inference_service/warmup.py); the
        model is closed when it fails, and the load fails with it."""
        try:
            return warm_up(model)
        except BaseException:
            model.close()
            raise

    def _report_load(self, spec: ModelSpec, loaded: _Measured, used: int) -> None:
        logger.info(
            "model loaded",
            extra={
                "model_id": spec.model_id,
                "kind": spec.kind,
                "load_seconds": round(loaded.seconds, 3),
                "warmup_seconds": None if loaded.warmup_seconds is None else round(loaded.warmup_seconds, 3),
                "memory_bytes": loaded.memory_bytes,
                "estimate_bytes": loaded.estimate,
                "memory_used_bytes": used,
            },
        )
        if self._metrics is not None:
            self._metrics.model_loads.labels(spec.model_id, "ok").inc()
            self._metrics.load_duration.labels(spec.model_id).observe(loaded.seconds)
        budget = self._reg.budget
        if used > budget:
            logger.warning(
                "model cache over its memory budget",
                extra={"model_id": spec.model_id, "memory_used_bytes": used, "memory_budget_bytes": budget},
            )

    def _load_measure(self) -> int:
        if self._device_type == "cuda":
            # CTranslate2 allocates outside torch's allocator; the device-wide figure sees it.
            return max(self._probe.cuda_allocated_bytes(self._device), self._probe.device_used_bytes(self._device))
        return self._probe.process_rss_bytes()

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """Memory the model is expected to take once loaded.

        The median of the last loads of this model_id by this cache (while its size on
        disk is unchanged), else its size on disk times the factor of its kind.
        """
        with self._lock:
            return self._footprints.estimate(spec)
