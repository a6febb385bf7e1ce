"""ModelCache: models loaded on first use, kept within a count limit and a memory budget, shared through leases."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import cast

from opentelemetry import trace
from opentelemetry.trace import Tracer
from typing_extensions import TypeVar

from inference_service.errors import ModelLoadFailed
from inference_service.memory import MemoryProbe, format_bytes, is_cuda
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache.cache_types import (
    UNKNOWN_MODEL_LABEL,
    CacheConfig,
    CacheEntry,
    CacheStats,
    Lease,
    LimitsChange,
    LoadedModel,
    LoadedModelInfo,
    LoadProgress,
    ModelSpec,
    ProgressCallback,
    kind_accepted,
    wrong_kind,
)
from inference_service.model_cache.loading import Flight, Measured, ModelLoader
from inference_service.model_cache.policy import NewLimits, check_limits
from inference_service.model_cache.reservations import Reservation
from inference_service.model_cache.state import CacheState
from inference_service.model_cache.watchdog import MemoryWatchdog
from voxserve_common.client_strings import check_model_id
from voxserve_common.errors import InvalidArgument, NotFound, VoxserveError
from voxserve_common.logs import log_context

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_FRACTION = 0.8

E = TypeVar("E", bound=LoadedModel)


class ModelCache:
    """Loads models on first use and keeps them within max_models and a memory budget.

    ``resolve(model_id, on_progress)`` turns an id into a ModelSpec and may be slow (it may
    pull the model from the store, reporting progress); ``load(spec)`` builds the model (the
    engines' loader: inference_service/engines/loaders.py). Concurrent acquires of a cold model
    share one resolve+load. Before a load, idle unpinned models are evicted least-recently-used
    first until the new model's estimated footprint fits; models that are pinned or leased are
    never evicted. Loads of different models run one at a time so that each one's memory can be
    measured (RSS delta on CPU, allocated-memory delta on CUDA).

    What the cache knows is in one CacheState (state.py); the loads in a ModelLoader (loading.py);
    the decisions in policy.py.
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
        self._resolve = resolve
        self._probe = memory if memory is not None else MemoryProbe()
        self._device = config.device
        self._device_total = self._probe.device_total_bytes(config.device)
        if config.memory_budget_bytes is not None:
            budget = config.memory_budget_bytes
        else:
            budget = int(self._device_total * DEFAULT_BUDGET_FRACTION)
        self._loader = ModelLoader(load, self._probe, config.device, config.warmup)
        self._state = CacheState(
            budget=budget,
            max_models=config.max_models,
            free=self._loader.free,
            metrics=metrics,
            device_type="cuda" if is_cuda(config.device) else "cpu",
        )
        self._watchdog = MemoryWatchdog(config, self._state, self._loader, self._probe, self._device_total)

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def memory_budget_bytes(self) -> int:
        """The budget in force (SetCacheLimits may have changed it since start-up)."""
        return self._state.budget

    @property
    def max_models(self) -> int:
        """The count limit in force."""
        return self._state.max_models

    @property
    def device_total_bytes(self) -> int:
        return self._device_total

    @property
    def warmup(self) -> bool:
        """Whether loads of Whisper models end with a warm-up decode (a reloadable setting)."""
        return self._loader.warmup

    @warmup.setter
    def warmup(self, enabled: bool) -> None:
        self._loader.warmup = enabled

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
        return self._checkout(model_id, expected_kind, on_progress)

    def acquire_as(
        self, model_id: str, engine_type: type[E], *, on_progress: ProgressCallback | None = None
    ) -> Lease[E]:
        """acquire() with engine_type.kind as the expected kind, typed as that engine, for
        callers that use the engine's own methods.

        Raises what acquire raises, and ModelLoadFailed when the loader built another
        class than engine_type for that kind.
        """
        lease = self._checkout(model_id, engine_type.kind, on_progress)
        if not isinstance(lease.model, engine_type):
            lease.release()
            raise ModelLoadFailed(
                f"model {model_id!r} of kind {lease.kind} was loaded as {type(lease.model).__name__}, "
                f"not {engine_type.__name__}"
            )
        return cast("Lease[E]", lease)

    def _checkout(self, model_id: str, expected_kind: str | None, on_progress: ProgressCallback | None) -> Lease:
        if not model_id:
            raise InvalidArgument("model_id is empty")
        check_model_id(model_id)
        # One span per acquire, a child of the caller's (the RPC's or the job's: callers run in
        # a copy of the RPC's context, asyncio.to_thread and JobManager.submit both copy it).
        # On a hit it records the hit and nothing else; on a miss it covers resolve, load, warm-up.
        attributes = {"voxserve.model_id": model_id, "voxserve.device": self._device}
        with (
            log_context(model_id=model_id),
            self._tracer.start_as_current_span("inference.model_load", attributes=attributes) as span,
        ):
            lease = self._checkout_traced(model_id, expected_kind, on_progress)
            info = self._state.lease_info(lease, pin=False)
            span.set_attribute("voxserve.cache.hit", lease.cache_hit)
            span.set_attribute("voxserve.model.bytes", info.memory_bytes)
            span.set_attribute("voxserve.device", info.device)
            if not lease.cache_hit:
                span.set_attribute("voxserve.model.load_seconds", round(lease.load_seconds, 3))
            return lease

    def _checkout_traced(self, model_id: str, expected_kind: str | None, on_progress: ProgressCallback | None) -> Lease:
        while True:
            got = self._state.checkout(model_id, expected_kind)
            if isinstance(got, Lease):
                return got
            logger.info("model cache miss", extra={"model_id": model_id, "joined_load": not got.leader})
            if on_progress is not None:
                got.flight.listen(on_progress)
            if got.leader:
                self._run_flight(got.flight)
            try:
                result = got.flight.future.result()
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
            if got.participant.lease is not None:
                return got.participant.lease
            # else: joined a flight that loaded nothing (it was started for another kind)

    def _count_miss(self, label: str) -> None:
        if self._metrics is not None:
            self._metrics.cache_misses.labels(label).inc()

    def reserve(self, nbytes: int, label: str) -> Reservation:
        """Count memory held outside the models (a live stream's state) as used until the
        reservation is released (or its ``with`` ends); idle models are evicted to make room.

        May free models, so call it off the event loop. Raises CacheFull when models that
        cannot be evicted leave no room, InvalidArgument for a negative size.
        """
        return self._state.reserve(nbytes, label)

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """Memory the model is expected to take once loaded.

        The median of the last loads of this model_id by this cache (while its size on
        disk is unchanged), else its size on disk times the factor of its kind.
        """
        return self._state.estimate(spec)

    # -- loading (the leader of a flight runs it; the others wait on its future) ----

    def _run_flight(self, flight: Flight) -> None:
        """Resolve and load for every participant of the flight; never raises an Exception."""
        model_id = flight.model_id
        stage = "resolving"
        try:
            spec = self._resolve(model_id, flight.report)
            if self._state.settle_unwanted(flight, spec):
                return
            stage = "loading"
            loaded = self._loader.load(spec, lambda: self._state.make_room(spec), flight.report)
            message = f"loaded in {loaded.seconds:.2f} s, {format_bytes(loaded.memory_bytes)}"
            flight.report(LoadProgress(model_id, "loaded", message=message))
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
            used = self._state.add_loaded(flight, entry, loaded.seconds)
            self._report_load(spec, loaded, used)
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
        self._state.fail(flight)
        logger.warning(
            "model load failed", extra={"model_id": model_id, "stage": stage, "error": str(failure)}, exc_info=exc
        )
        if self._metrics is not None:
            label = UNKNOWN_MODEL_LABEL if isinstance(failure, NotFound) else model_id
            self._metrics.model_loads.labels(label, "error").inc()
        flight.future.set_exception(failure)

    def _report_load(self, spec: ModelSpec, loaded: Measured, used: int) -> None:
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
        budget = self._state.budget
        if used > budget:
            logger.warning(
                "model cache over its memory budget",
                extra={"model_id": spec.model_id, "memory_used_bytes": used, "memory_budget_bytes": budget},
            )

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
        with self.acquire(model_id, expected_kind=expected_kind, on_progress=on_progress) as lease:
            return self._state.lease_info(lease, pin=pin)

    def touch_loaded(self, model_id: str, pin: bool = False) -> LoadedModelInfo | None:
        """If the model is loaded: count a hit, mark it used (and pinned) and return its
        info; else None. Never waits for a load, so an event loop may call it."""
        with log_context(model_id=model_id):
            info = self._state.touch(model_id, pin)
        if info is None:
            return None
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
        with log_context(model_id=model_id):
            return self._state.unload(model_id, force)

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
        change, before, held = self._state.set_limits(new.max_models, new.memory_budget_bytes)
        stats = change.stats
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
                    "held": held,
                },
            )
        return change

    def loaded(self) -> list[LoadedModelInfo]:
        """Every loaded model, least recently used first."""
        return self._state.loaded()

    def stats(self) -> CacheStats:
        return self._state.stats()

    # -- memory watchdog ------------------------------------------------------------

    def check_memory_once(self) -> list[str]:
        """Evict idle, unpinned models (least recently used first) while memory is over the threshold.

        "Over" means what the process has added since the cache was created (RSS on CPU,
        device memory in use on CUDA) exceeds watchdog_threshold x the budget, or the whole
        device is fuller than watchdog_threshold of its memory. Returns the evicted ids.
        """
        return self._watchdog.check_once()

    def set_watchdog(
        self,
        threshold: float | None = None,
        interval_seconds: float | None = None,
        idle_ttl_seconds: float | None = None,
    ) -> None:
        """Change the watchdog's threshold, interval and/or idle TTL at run time (None =
        unchanged); InvalidArgument naming the setting for a value out of range (nothing
        changes then)."""
        self._watchdog.set(threshold, interval_seconds, idle_ttl_seconds)

    def expire_idle_once(self) -> list[str]:
        """Unload the idle, unpinned models nobody used for idle_ttl_seconds (the watchdog's
        thread does it on its own); returns their ids."""
        return self._watchdog.expire_idle_once()

    def start_watchdog(self) -> None:
        """Check memory every watchdog_interval_seconds in a daemon thread until stop()."""
        self._watchdog.start()

    def stop(self) -> None:
        """Stop the watchdog thread (models stay loaded)."""
        self._watchdog.stop()

    def close(self) -> None:
        """Stop the watchdog and unload every model (models in use close at their last release)."""
        self.stop()
        self._state.unload_all()
