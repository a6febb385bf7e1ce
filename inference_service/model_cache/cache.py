"""ModelCache: models loaded on first use, kept within a count limit and a memory budget, shared through leases."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace import Tracer
from typing_extensions import TypeVar

from inference_service.errors import ModelInUse, ModelLoadFailed, ModelNotLoaded
from inference_service.memory import MemoryProbe, is_cuda
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache.cache_types import (
    UNKNOWN_MODEL_LABEL,
    CacheConfig,
    CacheEntry,
    CacheStats,
    Lease,
    LoadedModel,
    LoadedModelInfo,
    ModelSpec,
    ProgressCallback,
)
from inference_service.model_cache.eviction import evictable
from inference_service.model_cache.flight import Flight, kind_accepted, wrong_kind
from inference_service.model_cache.limits import LimitsChange, NewLimits, check_limits, held_over, over_limits
from inference_service.model_cache.loading import FlightLoader
from inference_service.model_cache.registry import CacheRegistry
from inference_service.model_cache.reservations import Reservation, reserve
from inference_service.model_cache.watchdog import MemoryWatchdog, memory_pressure, process_used
from voxserve_common.client_strings import check_model_id, shown
from voxserve_common.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.8

E = TypeVar("E", bound=LoadedModel)


@dataclass(frozen=True)
class _Checkout:
    """An entry whose refcount the caller now holds, before it is wrapped in a Lease."""

    entry: CacheEntry
    model: LoadedModel
    cache_hit: bool
    load_seconds: float


def _held_reason(entry: CacheEntry) -> str:
    reasons = (["pinned"] if entry.pinned else []) + ([f"in use by {entry.refcount}"] if entry.refcount else [])
    return ", ".join(reasons)


class ModelCache:
    """Loads models on first use and keeps them within max_models and a memory budget.

    ``resolve(model_id, on_progress)`` turns an id into a ModelSpec and may be slow (it may
    pull the model from the store, reporting progress); ``load(spec)`` builds the model.
    Concurrent acquires of a cold model share one resolve+load. Before a load, idle
    unpinned models are evicted least-recently-used first until the new model's estimated
    footprint fits; models that are pinned or leased are never evicted. Loads of different
    models run one at a time so that each one's memory can be measured (RSS delta on CPU,
    allocated-memory delta on CUDA).
    """

    def __init__(
        self,
        config: CacheConfig,
        resolve: Callable[[str, ProgressCallback | None], ModelSpec],
        load: Callable[[ModelSpec], LoadedModel],
        metrics: InferenceMetrics | None = None,
        memory: MemoryProbe | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._config = config
        self._tracer = tracer if tracer is not None else trace.get_tracer(__name__)
        self._metrics = metrics
        self._probe = memory if memory is not None else MemoryProbe()
        self._device = config.device
        self._device_type = "cuda" if is_cuda(config.device) else "cpu"
        self._device_total = self._probe.device_total_bytes(config.device)
        if config.memory_budget_bytes is not None:
            budget = config.memory_budget_bytes
        else:
            budget = int(self._device_total * DEFAULT_BUDGET_FRACTION)
        gc.collect()
        self._probe.return_freed_memory(self._device)
        self._baseline_used = process_used(self._probe, self._device)

        self._reg = CacheRegistry(self._probe, self._device, budget, config.max_models, metrics)
        self._lock = self._reg.lock
        self._loader = FlightLoader(self._reg, resolve, load, self._probe, config)
        self._watchdog = MemoryWatchdog(config.watchdog_interval_seconds, self.check_memory_once)

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def memory_budget_bytes(self) -> int:
        """The budget in force (SetCacheLimits may have changed it since start-up)."""
        return self._reg.budget

    @property
    def max_models(self) -> int:
        """The count limit in force."""
        return self._reg.max_models

    @property
    def device_total_bytes(self) -> int:
        return self._device_total

    # -- using models ---------------------------------------------------------------

    def acquire(
        self, model_id: str, *, expected_kind: str | None = None, on_progress: ProgressCallback | None = None
    ) -> Lease:
        """Check a model out, loading it first if needed; release the lease when done.

        expected_kind is a ModelKind (or its name); None accepts any kind. Raises
        WrongModelKind before loading anything when the model is not expected_kind,
        CacheFull when it cannot fit without evicting pinned or leased models, whatever
        ``resolve`` raises (a domain error such as NotFound), and ModelLoadFailed for any
        other failure of resolve or load. A failure is not cached: the next acquire tries
        again. Every concurrent caller of one load gets its result or its exception.
        """
        out = self._checkout(model_id, expected_kind, on_progress)
        return Lease(self._release, out.entry, out.model, cache_hit=out.cache_hit, load_seconds=out.load_seconds)

    def acquire_as(
        self, model_id: str, engine_type: type[E], *, on_progress: ProgressCallback | None = None
    ) -> Lease[E]:
        """acquire() with engine_type.kind as the expected kind, typed as that engine, for
        callers that use the engine's own methods.

        Raises what acquire raises, and ModelLoadFailed when the loader built another
        class than engine_type for that kind.
        """
        out = self._checkout(model_id, engine_type.kind, on_progress)
        model = out.model
        if not isinstance(model, engine_type):
            self._release(Lease(self._release, out.entry, model, cache_hit=out.cache_hit, load_seconds=0.0))
            raise ModelLoadFailed(
                f"model {model_id!r} of kind {out.entry.kind} was loaded as {type(model).__name__}, "
                f"not {engine_type.__name__}"
            )
        return Lease(self._release, out.entry, model, cache_hit=out.cache_hit, load_seconds=out.load_seconds)

    @property
    def warmup(self) -> bool:
        """Whether loads of Whisper models end with a warm-up decode (a live setting)."""
        return self._loader.warmup

    @warmup.setter
    def warmup(self, enabled: bool) -> None:
        self._loader.warmup = enabled

    def _checkout(self, model_id: str, expected_kind: str | None, on_progress: ProgressCallback | None) -> _Checkout:
        if not model_id:
            raise InvalidArgument("model_id is empty")
        check_model_id(model_id)
        # One span per acquire, a child of the caller's (the RPC's or the job's: callers run in
        # a copy of the RPC's context, asyncio.to_thread and JobManager.submit both copy it).
        # On a hit it records the hit and nothing else; on a miss it covers resolve, load, warm-up.
        attributes = {"voxserve.model_id": model_id, "voxserve.device": self._device}
        with self._tracer.start_as_current_span("inference.model_load", attributes=attributes) as span:
            out = self._checkout_traced(model_id, expected_kind, on_progress)
            span.set_attribute("voxserve.cache.hit", out.cache_hit)
            span.set_attribute("voxserve.model.bytes", out.entry.memory_bytes)
            span.set_attribute("voxserve.device", out.entry.device)
            if not out.cache_hit:
                span.set_attribute("voxserve.model.load_seconds", round(out.load_seconds, 3))
            return out

    def _checkout_traced(
        self, model_id: str, expected_kind: str | None, on_progress: ProgressCallback | None
    ) -> _Checkout:
        while True:
            with self._lock:
                entry = self._reg.entries.get(model_id)
                if entry is not None:
                    return _Checkout(entry, self._reg.hit_locked(entry, expected_kind), True, 0.0)
                flight = self._reg.flights.get(model_id)
                leader = flight is None
                if flight is None:
                    flight = self._reg.flights[model_id] = Flight(model_id)
                flight.expected_kinds.append(expected_kind)
                self._reg.misses += 1
            logger.info("model cache miss", extra={"model_id": model_id, "joined_load": not leader})
            if on_progress is not None:
                flight.listen(on_progress)
            if leader:
                self._loader.run(flight)
            try:
                result = flight.future.result()
            except NotFound:
                # An id the store does not know is counted under one label: a caller sending
                # made-up ids must not create a metric series per id.
                self._count_miss(UNKNOWN_MODEL_LABEL)
                raise
            except BaseException:
                self._count_miss(model_id)
                raise
            self._count_miss(model_id)
            if not kind_accepted(expected_kind, result.spec.kind):
                raise wrong_kind(model_id, result.spec.kind, expected_kind)
            if result.entry is None:
                continue  # joined a flight that loaded nothing (it was started for another kind)
            assert result.entry.model is not None
            return _Checkout(result.entry, result.entry.model, cache_hit=False, load_seconds=result.load_seconds)

    def _count_miss(self, label: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_misses.labels(label).inc()

    def _release(self, lease: Lease) -> None:
        entry = lease._entry
        with self._lock:
            if lease._released:
                return
            lease._released = True
            entry.refcount -= 1
            entry.last_used = time.time()
            close_now = entry.detached and entry.refcount == 0
            # Limits lowered while models were in use: the cache catches up as they go idle.
            trimmed = [] if close_now else self._trim_to_limits_locked()
        if close_now:
            self._reg.free([entry])
        self._reg.free(trimmed)

    def _trim_to_limits_locked(self) -> list[CacheEntry]:
        plan = over_limits(list(self._reg.entries.values()), self._reg.max_models, self._reg.room_locked())
        for victim, reason in plan:
            self._reg.evict_locked(victim, reason)
        return [victim for victim, _ in plan]

    def reserve(self, nbytes: int, label: str) -> Reservation:
        """Count memory held outside the models (a live stream's state) as used until the
        reservation is released (or its ``with`` ends); idle models are evicted to make room.

        May free models, so call it off the event loop. Raises CacheFull when models that
        cannot be evicted leave no room, InvalidArgument for a negative size.
        """
        return reserve(self._reg, nbytes, label)

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """Memory the model is expected to take once loaded.

        The median of the last loads of this model_id by this cache (while its size on
        disk is unchanged), else its size on disk times the factor of its kind.
        """
        return self._loader.estimate_bytes(spec)

    # -- managing models ------------------------------------------------------------

    def load_model(
        self,
        model_id: str,
        pin: bool = False,
        *,
        expected_kind: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> LoadedModelInfo:
        """Load a model now (or find it loaded); pin=True keeps it until unloaded explicitly.

        Raises what acquire raises.
        """
        with self.acquire(model_id, expected_kind=expected_kind, on_progress=on_progress) as lease, self._lock:
            if pin:
                lease._entry.pinned = True
            return lease._entry.info(own_leases=1)

    def touch_loaded(self, model_id: str, pin: bool = False) -> LoadedModelInfo | None:
        """If the model is loaded: count a hit, mark it used (and pinned) and return its
        info; else None. Never waits for a load, so an event loop may call it."""
        with self._lock:
            entry = self._reg.entries.get(model_id)
            if entry is None or entry.model is None or entry.detached:
                return None
            model = self._reg.hit_locked(entry, None)
            if pin:
                entry.pinned = True
            info = entry.info(own_leases=1)
        self._release(Lease(self._release, entry, model, cache_hit=True, load_seconds=0.0))
        attributes: dict[str, str | bool | int] = {
            "voxserve.model_id": model_id,
            "voxserve.device": info.device,
            "voxserve.cache.hit": True,
            "voxserve.model.bytes": info.memory_bytes,
        }
        self._tracer.start_span("inference.model_load", attributes=attributes).end()
        return info

    def unload(self, model_id: str, force: bool = False) -> LoadedModelInfo:
        """Remove a model from the cache and free its memory.

        Raises ModelNotLoaded when it is not loaded and ModelInUse when leases are held,
        unless force: then it leaves the cache now and is closed when its last lease is
        released. Pinned models are unloaded too.
        """
        with self._lock:
            entry = self._reg.entries.get(model_id)
            if entry is None:
                loading = " (it is being loaded now)" if model_id in self._reg.flights else ""
                raise ModelNotLoaded(f"model {shown(model_id)} is not loaded{loading}")
            if entry.refcount and not force:
                raise ModelInUse(
                    f"model {model_id!r} is in use by {entry.refcount} lease{'s' if entry.refcount != 1 else ''}; "
                    "retry when they finish, or unload with force to close it after them"
                )
            info = entry.info()
            self._reg.evict_locked(entry, "unload")
            entry.detached = entry.refcount > 0
            close_now = not entry.detached
        if close_now:
            self._reg.free([entry])
        return info

    def preload(self, items: Iterable[tuple[str, bool]]) -> list[tuple[str, Exception]]:
        """Load (model_id, pin) pairs at start-up; returns the failures instead of raising."""
        failures: list[tuple[str, Exception]] = []
        for model_id, pin in items:
            try:
                self.load_model(model_id, pin=pin)
            except Exception as exc:  # noqa: BLE001 - a failed preload is reported, the others still run
                logger.warning("model preload failed", extra={"model_id": model_id, "error": str(exc)})
                failures.append((model_id, exc))
        return failures

    def check_limits(self, max_models: int | None = None, memory_budget: str | None = None) -> NewLimits:
        """The limits set_limits would apply, checked (InvalidArgument naming the field) but not applied."""
        return check_limits(max_models, memory_budget, self._device_total)

    def set_limits(self, max_models: int | None = None, memory_budget: str | None = None) -> LimitsChange:
        """Change max_models and/or the memory budget now (None or "" = unchanged), then evict
        idle, unpinned models least recently used first until the new limits hold.

        memory_budget is read like the memory_budget setting ("2GiB", "80%", bytes). Raises
        InvalidArgument naming the field for a bad value (nothing changes then). Models in use
        or pinned are never evicted: when they alone keep the cache over the new limits, the
        limits are in force anyway (new loads must fit them), the change reports them in
        ``held_over`` with a warning, and each leased one is evicted when its last lease ends
        while the cache is still over (pinned ones stay until unloaded).
        """
        new = self.check_limits(max_models, memory_budget)
        with self._lock:
            before = (self._reg.max_models, self._reg.budget)
            self._reg.set_limits_locked(
                new.max_models if new.max_models is not None else self._reg.max_models,
                new.memory_budget_bytes if new.memory_budget_bytes is not None else self._reg.budget,
            )
            evicted = self._trim_to_limits_locked()
            entries = list(self._reg.entries.values())
            over = held_over(entries, self._reg.max_models, self._reg.room_locked())
            stats = self._reg.stats_locked()
        self._reg.free(evicted)
        change = LimitsChange(stats, tuple(e.model_id for e in evicted), tuple(e.model_id for e in over))
        logger.info(
            "model cache limits changed",
            extra={
                "max_models": stats.max_models,
                "memory_budget_bytes": stats.memory_budget_bytes,
                "previous_max_models": before[0],
                "previous_memory_budget_bytes": before[1],
                "evicted": list(change.evicted),
            },
        )
        if change.over_limits:
            logger.warning(
                "model cache over its new limits until the models in use are released or unpinned",
                extra={
                    "loaded_models": stats.loaded_models,
                    "max_models": stats.max_models,
                    "memory_used_bytes": stats.memory_used_bytes,
                    "memory_budget_bytes": stats.memory_budget_bytes,
                    "held": [f"{e.model_id} ({_held_reason(e)})" for e in over],
                },
            )
        return change

    def loaded(self) -> list[LoadedModelInfo]:
        """Every loaded model, least recently used first."""
        return self._reg.loaded()

    def stats(self) -> CacheStats:
        return self._reg.stats()

    # -- memory watchdog ------------------------------------------------------------

    def check_memory_once(self) -> list[str]:
        """Evict idle, unpinned models (least recently used first) while memory is over the threshold.

        "Over" means what the process has added since the cache was created (RSS on CPU,
        device memory in use on CUDA) exceeds watchdog_threshold x the budget, or the whole
        device is fuller than watchdog_threshold of its memory. Returns the evicted ids.
        """
        evicted: list[str] = []
        while (pressure := self._memory_pressure()) is not None:
            with self._lock:
                victim = next((e for e in self._reg.entries.values() if evictable(e)), None)
                if victim is not None:
                    self._reg.evict_locked(victim, "watchdog")
            if victim is None:
                logger.warning("memory over the watchdog threshold and no model can be evicted", extra=pressure)
                break
            self._reg.free([victim])
            evicted.append(victim.model_id)
        return evicted

    def _memory_pressure(self) -> dict[str, int] | None:
        return memory_pressure(
            self._probe,
            self._device,
            baseline=self._baseline_used,
            budget=self._reg.budget,
            device_total=self._device_total,
            threshold=self._config.watchdog_threshold,
        )

    def set_watchdog(self, threshold: float | None = None, interval_seconds: float | None = None) -> None:
        """Change the watchdog's threshold and/or interval at run time (None = unchanged);
        InvalidArgument naming the setting for a value out of range (nothing changes then)."""
        if threshold is not None and not 0 < threshold <= 1:
            raise InvalidArgument(f"watchdog_threshold must be in (0, 1], not {threshold}")
        if interval_seconds is not None and not interval_seconds > 0:
            raise InvalidArgument(f"watchdog_interval_seconds must be positive, not {interval_seconds}")
        if threshold is not None:
            self._config.watchdog_threshold = threshold
        if interval_seconds is not None:
            self._config.watchdog_interval_seconds = interval_seconds
            self._watchdog.interval = interval_seconds

    def start_watchdog(self) -> None:
        """Check memory every watchdog_interval_seconds in a daemon thread until stop()."""
        self._watchdog.start()

    def stop(self) -> None:
        """Stop the watchdog thread (models stay loaded)."""
        self._watchdog.stop()

    def close(self) -> None:
        """Stop the watchdog and unload every model (models in use close at their last release)."""
        self.stop()
        with self._lock:
            entries = list(self._reg.entries.values())
            for entry in entries:
                self._reg.evict_locked(entry, "unload")
                entry.detached = entry.refcount > 0
            idle = [e for e in entries if not e.detached]
        self._reg.free(idle)
