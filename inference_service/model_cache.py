"""Keeps loaded models in memory within a count limit and a memory budget, shared through leases."""

from __future__ import annotations

import contextlib
import gc
import logging
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from inference_service.memory import MemoryProbe, format_bytes, is_cuda
from inference_service.metrics import InferenceMetrics
from voxserve_common.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    VoxserveError,
)
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)

# Memory a loaded model takes, as a multiple of its files on disk, for a model_id the
# cache has never loaded (afterwards the measured bytes of that model_id are used).
# Measured on CPU (RSS delta around the load, psutil), 2 cores, torch 2.13 / CT2 4.8.5:
# - whisper: tiny.en CTranslate2 (float16 model.bin 75.5 MB, 78 MB with the tokenizer)
#   with compute_type=int8 took 51-55 MiB (0.7x) with freed memory returned to the OS
#   before and after the load (as the cache does), 66-91 MiB without the trim after it;
#   float32 took 155 MiB (2x). 1.0x fits int8, the project's CPU default, with room to
#   spare; a float32/float16 load is corrected by its first measurement.
# - vad: Silero VAD 6.2.3 as shipped: JIT (2.3 MB) 3.9 MiB (1.7x); ONNX (2.3 MB) 21.7 MiB
#   on its first onnxruntime session (9x), nothing for later ones. 4x.
# - demucs: safetensors exports of HDemucs/HTDemucs (2.3-46 MB) hold their weights once
#   loaded (~1x) but briefly hold them twice during load_safetensors_model (the file's
#   tensors and the module's), so 2x.
FOOTPRINT_FACTORS: Mapping[ModelKind, float] = {ModelKind.WHISPER: 1.0, ModelKind.VAD: 4.0, ModelKind.DEMUCS: 2.0}
UNKNOWN_KIND_FACTOR = 2.0
# No model is accounted below this: an RSS delta can come out near zero when a load
# reuses pages freed earlier (or negative when another thread frees memory meanwhile).
MIN_MODEL_BYTES = 1 << 20
DEFAULT_BUDGET_FRACTION = 0.8
# Measurements per model_id whose median is its estimate: one outlier is outvoted once
# two more loads were measured.
MEASUREMENTS_KEPT = 3
EVICTION_REASONS = ("count_limit", "memory_budget", "watchdog", "unload")


class CacheFull(ResourceExhausted):
    """A model cannot be loaded without evicting a model that is pinned or in use."""

    def __init__(self, message: str, *, model_id: str, estimate_bytes: int, budget_bytes: int, held: list[str]) -> None:
        super().__init__(message)
        self.model_id = model_id
        self.estimate_bytes = estimate_bytes
        self.budget_bytes = budget_bytes
        self.held = held


class ModelInUse(FailedPrecondition):
    """The model has leases held; it can only be unloaded with force."""


class ModelNotLoaded(NotFound):
    """The model is not in the cache."""


class WrongModelKind(InvalidArgument):
    """The model exists but is another kind than the request needs (a VAD model for transcription)."""


class ModelLoadFailed(Internal):
    """Resolving or loading a model raised an error that is not a domain error."""


@dataclass(frozen=True)
class LoadProgress:
    """One step of getting a model ready.

    The resolver reports what it likes (stage "pulling" with bytes while the store
    downloads); the cache adds "loading" before and "loaded" after building the model.
    """

    model_id: str
    stage: str
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""


ProgressCallback = Callable[[LoadProgress], None]


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to load a model: its kind and files (size_bytes: all its files on disk).

    A kind's name ("whisper") is accepted and converted to its ModelKind.
    """

    model_id: str
    kind: ModelKind
    path: Path
    size_bytes: int

    def __post_init__(self) -> None:
        kind = ModelKind.parse(self.kind)
        if kind is None:
            raise InvalidArgument(
                f"model {self.model_id!r} has kind {self.kind!r}; expected one of {', '.join(ModelKind)}"
            )
        object.__setattr__(self, "kind", kind)
        if self.size_bytes < 0:
            raise InvalidArgument(f"model {self.model_id!r} has a negative size ({self.size_bytes} bytes)")


class LoadedModel(Protocol):
    """What the cache needs of a loaded model; engines add their own methods."""

    @property
    def kind(self) -> str: ...

    @property
    def device(self) -> str: ...

    @property
    def compute_type(self) -> str: ...

    def close(self) -> None: ...


@dataclass
class CacheConfig:
    """Limits of the model cache.

    memory_budget_bytes None means 80% of the device's memory (RAM on CPU, VRAM on CUDA).
    The watchdog evicts idle models when what the process has added since start-up
    (RSS on CPU, device memory in use on CUDA) passes watchdog_threshold x the budget, or
    when the whole device is fuller than watchdog_threshold of its memory.
    Models named in pinned are pinned whenever they are loaded.
    """

    max_models: int = 3
    memory_budget_bytes: int | None = None
    device: str = "cpu"
    watchdog_interval_seconds: float = 5.0
    watchdog_threshold: float = 0.9
    pinned: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_models < 1:
            raise InvalidArgument(f"max_models must be at least 1, not {self.max_models}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise InvalidArgument(f"memory budget must be positive, not {self.memory_budget_bytes} bytes")
        if self.device != "cpu" and not is_cuda(self.device):
            raise InvalidArgument(f"device {self.device!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
        if self.watchdog_interval_seconds <= 0:
            raise InvalidArgument(f"watchdog interval must be positive, not {self.watchdog_interval_seconds}")
        if not 0 < self.watchdog_threshold <= 1:
            raise InvalidArgument(f"watchdog threshold must be in (0, 1], not {self.watchdog_threshold}")
        self.pinned = tuple(self.pinned)


@dataclass(frozen=True)
class LoadedModelInfo:
    """A snapshot of one cache entry (loaded_at and last_used are wall-clock epoch seconds)."""

    model_id: str
    kind: ModelKind
    device: str
    compute_type: str
    memory_bytes: int
    loaded_at: float
    last_used: float
    hits: int
    in_use: int
    pinned: bool


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was created, and the memory figures now."""

    hits: int
    misses: int
    evictions: int
    loads: int
    load_failures: int
    memory_used_bytes: int
    memory_budget_bytes: int
    max_models: int
    evictions_by_reason: Mapping[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Entry:
    spec: ModelSpec
    model: LoadedModel | None
    kind: ModelKind
    device: str
    compute_type: str
    memory_bytes: int
    loaded_at: float
    last_used: float
    pinned: bool
    hits: int = 0
    refcount: int = 0
    detached: bool = False  # unloaded with force while in use: closed at the last release

    @property
    def model_id(self) -> str:
        return self.spec.model_id


@dataclass(frozen=True)
class _FlightResult:
    spec: ModelSpec
    entry: _Entry | None  # None: no participant wanted this kind, nothing was loaded
    load_seconds: float


class _Flight:
    """One resolve+load of a model that every concurrent acquire of it waits on."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.future: Future[_FlightResult] = Future()
        self.expected_kinds: list[str | None] = []  # one per participant; guarded by the cache lock
        self._listeners: list[ProgressCallback] = []
        self._last: LoadProgress | None = None
        self._lock = threading.Lock()

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


def _kind_accepted(expected_kind: str | None, kind: ModelKind) -> bool:
    return expected_kind is None or expected_kind == kind


def _wrong_kind(model_id: str, kind: ModelKind, expected_kind: str | None) -> WrongModelKind:
    return WrongModelKind(f"model {model_id!r} is a {kind} model, but this request needs a {expected_kind} model")


class Lease:
    """A model checked out of the cache: while it is held the model is neither evicted nor closed.

    Use it as a context manager; ``model`` must not be used after the lease is released.
    """

    def __init__(
        self, cache: ModelCache, entry: _Entry, model: LoadedModel, *, cache_hit: bool, load_seconds: float
    ) -> None:
        self.model = model
        self.model_id = entry.model_id
        self.kind = entry.kind
        self.cache_hit = cache_hit
        self.load_seconds = load_seconds
        self._cache = cache
        self._entry = entry
        self._released = False

    def release(self) -> None:
        """Give the model back; releasing twice is harmless."""
        self._cache._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"Lease({self.model_id!r}, {state}, cache_hit={self.cache_hit})"


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
    ) -> None:
        self._config = config
        self._resolve = resolve
        self._load = load
        self._metrics = metrics
        self._probe = memory if memory is not None else MemoryProbe()
        self._device = config.device
        self._device_type = "cuda" if is_cuda(config.device) else "cpu"
        self._device_total = self._probe.device_total_bytes(config.device)
        if config.memory_budget_bytes is not None:
            self._budget = config.memory_budget_bytes
        else:
            self._budget = int(self._device_total * DEFAULT_BUDGET_FRACTION)
        gc.collect()
        self._probe.return_freed_memory(self._device)
        self._baseline_used = self._process_used()

        self._lock = threading.Lock()
        # Held around each load (to measure it alone) and around freeing models.
        self._load_lock = threading.RLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._flights: dict[str, _Flight] = {}
        # model_id -> (size_bytes on disk, the last measured footprints)
        self._measured: dict[str, tuple[int, tuple[int, ...]]] = {}
        self._hits = 0
        self._misses = 0
        self._loads = 0
        self._load_failures = 0
        self._evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)

        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        if metrics is not None:
            metrics.memory_budget_bytes.labels(self._device_type).set(self._budget)
            metrics.memory_used_bytes.labels(self._device_type).set(0)
            metrics.loaded_models.set(0)

    @property
    def config(self) -> CacheConfig:
        return self._config

    @property
    def memory_budget_bytes(self) -> int:
        return self._budget

    # -- using models ---------------------------------------------------------------

    def acquire(
        self, model_id: str, *, expected_kind: str | None = None, on_progress: ProgressCallback | None = None
    ) -> Lease:
        """Check a model out, loading it first if needed; release the lease when done.

        Raises WrongModelKind before loading anything when the model is not expected_kind,
        CacheFull when it cannot fit without evicting pinned or leased models, whatever
        ``resolve`` raises (a domain error such as NotFound), and ModelLoadFailed for any
        other failure of resolve or load. A failure is not cached: the next acquire tries
        again. Every concurrent caller of one load gets its result or its exception.
        """
        if not model_id:
            raise InvalidArgument("model_id is empty")
        while True:
            with self._lock:
                entry = self._entries.get(model_id)
                if entry is not None:
                    return self._hit_locked(entry, expected_kind)
                flight = self._flights.get(model_id)
                leader = flight is None
                if flight is None:
                    flight = self._flights[model_id] = _Flight(model_id)
                flight.expected_kinds.append(expected_kind)
                self._misses += 1
            logger.info("model cache miss", extra={"model_id": model_id, "joined_load": not leader})
            if self._metrics is not None:
                self._metrics.cache_misses.labels(model_id).inc()
            if on_progress is not None:
                flight.listen(on_progress)
            if leader:
                self._run_flight(flight)
            result = flight.future.result()
            if not _kind_accepted(expected_kind, result.spec.kind):
                raise _wrong_kind(model_id, result.spec.kind, expected_kind)
            if result.entry is None:
                continue  # joined a flight that loaded nothing (it was started for another kind)
            assert result.entry.model is not None
            return Lease(self, result.entry, result.entry.model, cache_hit=False, load_seconds=result.load_seconds)

    def _hit_locked(self, entry: _Entry, expected_kind: str | None) -> Lease:
        if not _kind_accepted(expected_kind, entry.kind):
            raise _wrong_kind(entry.model_id, entry.kind, expected_kind)
        assert entry.model is not None
        entry.refcount += 1
        entry.hits += 1
        entry.last_used = time.time()
        self._entries.move_to_end(entry.model_id)
        self._hits += 1
        logger.debug("model cache hit", extra={"model_id": entry.model_id, "in_use": entry.refcount})
        if self._metrics is not None:
            self._metrics.cache_hits.labels(entry.model_id).inc()
        return Lease(self, entry, entry.model, cache_hit=True, load_seconds=0.0)

    def _release(self, lease: Lease) -> None:
        entry = lease._entry
        with self._lock:
            if lease._released:
                return
            lease._released = True
            entry.refcount -= 1
            entry.last_used = time.time()
            close_now = entry.detached and entry.refcount == 0
        if close_now:
            self._free([entry])

    # -- loading --------------------------------------------------------------------

    def _run_flight(self, flight: _Flight) -> None:
        """Resolve and load for every participant of the flight; never raises."""
        model_id = flight.model_id
        stage = "resolving"
        try:
            spec = self._resolve(model_id, flight.report)
            with self._lock:
                if not any(_kind_accepted(k, spec.kind) for k in flight.expected_kinds):
                    del self._flights[model_id]
                    flight.future.set_result(_FlightResult(spec, None, 0.0))
                    return
            stage = "loading"
            self._load_for(flight, spec)
        except BaseException as exc:
            if flight.future.done():  # failed after the model was handed out: the load stands
                logger.exception("model cache bookkeeping failed after a load", extra={"model_id": model_id})
                if not isinstance(exc, Exception):
                    raise
                return
            failure: BaseException = exc
            if isinstance(exc, Exception) and not isinstance(exc, VoxserveError):
                failure = ModelLoadFailed(f"{stage} model {model_id!r} failed: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
            with self._lock:
                self._flights.pop(model_id, None)
                self._load_failures += 1
            logger.warning(
                "model load failed", extra={"model_id": model_id, "stage": stage, "error": str(failure)}, exc_info=exc
            )
            if self._metrics is not None:
                self._metrics.model_loads.labels(model_id, "error").inc()
            flight.future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    def _load_for(self, flight: _Flight, spec: ModelSpec) -> None:
        model_id = flight.model_id
        with self._load_lock:
            estimate = self.estimate_bytes(spec)
            with self._lock:
                victims = self._make_room_locked(spec, estimate)
            self._free(victims)
            flight.report(LoadProgress(model_id, "loading", message=f"loading {spec.kind} model from {spec.path}"))
            # No gc.collect() here: with torch imported a full collection costs ~100 ms,
            # and _free() already collects whenever models are dropped.
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
        measured = max(after - before, MIN_MODEL_BYTES)
        flight.report(LoadProgress(model_id, "loaded", message=f"loaded in {seconds:.2f} s, {format_bytes(measured)}"))
        now = time.time()
        entry = _Entry(
            spec=spec,
            model=model,
            kind=spec.kind,
            device=str(getattr(model, "device", self._device)),
            compute_type=str(getattr(model, "compute_type", "")),
            memory_bytes=measured,
            loaded_at=now,
            last_used=now,
            pinned=model_id in self._config.pinned,
        )
        with self._lock:
            entry.refcount = sum(1 for k in flight.expected_kinds if _kind_accepted(k, spec.kind))
            self._entries[model_id] = entry
            del self._flights[model_id]
            self._remember_measurement(spec, measured)
            self._loads += 1
            # The measurement may exceed the estimate: trim idle models to the budget again.
            over = self._evict_over_budget_locked()
            used = self._used_locked()
            self._update_gauges_locked()
            flight.future.set_result(_FlightResult(spec, entry, seconds))
        logger.info(
            "model loaded",
            extra={
                "model_id": model_id,
                "kind": spec.kind,
                "load_seconds": round(seconds, 3),
                "memory_bytes": measured,
                "estimate_bytes": estimate,
                "memory_used_bytes": used,
            },
        )
        if self._metrics is not None:
            self._metrics.model_loads.labels(model_id, "ok").inc()
            self._metrics.load_duration.labels(model_id).observe(seconds)
        if used > self._budget:
            logger.warning(
                "model cache over its memory budget",
                extra={"model_id": model_id, "memory_used_bytes": used, "memory_budget_bytes": self._budget},
            )
        self._free(over)

    def _load_measure(self) -> int:
        if self._device_type == "cuda":
            # CTranslate2 allocates outside torch's allocator; the device-wide figure sees it.
            return max(self._probe.cuda_allocated_bytes(self._device), self._probe.device_used_bytes(self._device))
        return self._probe.process_rss_bytes()

    def _remember_measurement(self, spec: ModelSpec, measured: int) -> None:
        """Keep the last MEASUREMENTS_KEPT measurements of a model_id (call with the lock).

        An RSS delta also counts what other threads allocate during the load (a job
        decoding on another model); keeping the largest one forever let a single noisy
        load make a model look too big for the budget until a restart.
        """
        size, samples = self._measured.get(spec.model_id, (spec.size_bytes, ()))
        if size != spec.size_bytes:
            samples = ()
        self._measured[spec.model_id] = (spec.size_bytes, (*samples, measured)[-MEASUREMENTS_KEPT:])

    def estimate_bytes(self, spec: ModelSpec) -> int:
        """Memory the model is expected to take once loaded.

        The median of the last loads of this model_id by this cache (while its size on
        disk is unchanged), else its size on disk times the factor of its kind.
        """
        with self._lock:
            measured = self._measured.get(spec.model_id)
        if measured is not None and measured[0] == spec.size_bytes and measured[1]:
            return int(statistics.median(measured[1]))
        factor = FOOTPRINT_FACTORS.get(spec.kind, UNKNOWN_KIND_FACTOR)
        return max(int(spec.size_bytes * factor), MIN_MODEL_BYTES)

    def _make_room_locked(self, spec: ModelSpec, estimate: int) -> list[_Entry]:
        entries = list(self._entries.values())
        count = len(entries)
        used = sum(e.memory_bytes for e in entries)
        max_models = self._config.max_models

        def fits() -> bool:
            return count + 1 <= max_models and used + estimate <= self._budget

        plan: list[tuple[_Entry, str]] = []
        for entry in entries:
            if fits():
                break
            if entry.refcount or entry.pinned:
                continue
            plan.append((entry, "count_limit" if count + 1 > max_models else "memory_budget"))
            count -= 1
            used -= entry.memory_bytes
        if not fits():
            raise self._cache_full(spec, estimate, count, used)
        for entry, reason in plan:
            self._evict_locked(entry, reason)
        return [entry for entry, _ in plan]

    def _cache_full(self, spec: ModelSpec, estimate: int, count: int, used: int) -> CacheFull:
        held = []
        for e in self._entries.values():
            if e.refcount or e.pinned:
                why = []
                if e.pinned:
                    why.append("pinned")
                if e.refcount:
                    why.append(f"in use by {e.refcount} lease{'s' if e.refcount != 1 else ''}")
                held.append(f"{e.model_id!r} {format_bytes(e.memory_bytes)} ({', '.join(why)})")
        problems = []
        if estimate > self._budget:
            problems.append(f"it alone exceeds the memory budget of {format_bytes(self._budget)}")
        elif used + estimate > self._budget:
            problems.append(
                f"{format_bytes(used)} of the {format_bytes(self._budget)} memory budget is held by models "
                "that cannot be evicted"
            )
        if count + 1 > self._config.max_models:
            problems.append(f"{count} of at most {self._config.max_models} models cannot be evicted")
        message = (
            f"cannot load model {spec.model_id!r}: it needs about {format_bytes(estimate)} and "
            f"{' and '.join(problems)}; held: {', '.join(held) if held else 'nothing'}. "
            "Retry when leases are released, unload or unpin a model, or raise the limits"
        )
        return CacheFull(message, model_id=spec.model_id, estimate_bytes=estimate, budget_bytes=self._budget, held=held)

    def _evict_over_budget_locked(self) -> list[_Entry]:
        victims = []
        used = self._used_locked()
        for entry in list(self._entries.values()):
            if used <= self._budget:
                break
            if entry.refcount or entry.pinned:
                continue
            self._evict_locked(entry, "memory_budget")
            used -= entry.memory_bytes
            victims.append(entry)
        return victims

    def _evict_locked(self, entry: _Entry, reason: str) -> None:
        del self._entries[entry.model_id]
        self._evictions[reason] += 1
        logger.info(
            "model evicted",
            extra={
                "model_id": entry.model_id,
                "reason": reason,
                "memory_bytes": entry.memory_bytes,
                "in_use": entry.refcount,
            },
        )
        if self._metrics is not None:
            self._metrics.cache_evictions.labels(entry.model_id, reason).inc()
            with contextlib.suppress(KeyError):
                self._metrics.loaded_model_bytes.remove(entry.model_id)
        self._update_gauges_locked()

    def _free(self, entries: list[_Entry]) -> None:
        """Close evicted models and give their memory back to the OS / driver."""
        if not entries:
            return
        with self._load_lock:
            for entry in entries:
                model, entry.model = entry.model, None
                if model is None:
                    continue
                try:
                    model.close()
                except Exception:
                    logger.exception("closing model failed", extra={"model_id": entry.model_id})
                del model
            gc.collect()
            self._probe.return_freed_memory(self._device)

    def _used_locked(self) -> int:
        return sum(e.memory_bytes for e in self._entries.values())

    def _update_gauges_locked(self) -> None:
        if self._metrics is None:
            return
        self._metrics.loaded_models.set(len(self._entries))
        self._metrics.memory_used_bytes.labels(self._device_type).set(self._used_locked())
        for entry in self._entries.values():
            self._metrics.loaded_model_bytes.labels(entry.model_id).set(entry.memory_bytes)

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
            return self._info_locked(lease._entry, own_leases=1)

    def touch_loaded(self, model_id: str, pin: bool = False) -> LoadedModelInfo | None:
        """If the model is loaded: count a hit, mark it used (and pinned) and return its
        info; else None. Never waits for a load, so an event loop may call it."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None or entry.model is None or entry.detached:
                return None
            lease = self._hit_locked(entry, None)
            if pin:
                entry.pinned = True
            info = self._info_locked(entry, own_leases=1)
        lease.release()
        return info

    def unload(self, model_id: str, force: bool = False) -> LoadedModelInfo:
        """Remove a model from the cache and free its memory.

        Raises ModelNotLoaded when it is not loaded and ModelInUse when leases are held,
        unless force: then it leaves the cache now and is closed when its last lease is
        released. Pinned models are unloaded too.
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                loading = " (it is being loaded now)" if model_id in self._flights else ""
                raise ModelNotLoaded(f"model {model_id!r} is not loaded{loading}")
            if entry.refcount and not force:
                raise ModelInUse(
                    f"model {model_id!r} is in use by {entry.refcount} lease{'s' if entry.refcount != 1 else ''}; "
                    "retry when they finish, or unload with force to close it after them"
                )
            info = self._info_locked(entry)
            self._evict_locked(entry, "unload")
            entry.detached = entry.refcount > 0
            close_now = not entry.detached
        if close_now:
            self._free([entry])
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

    def loaded(self) -> list[LoadedModelInfo]:
        """Every loaded model, least recently used first."""
        with self._lock:
            return [self._info_locked(e) for e in self._entries.values()]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=sum(self._evictions.values()),
                loads=self._loads,
                load_failures=self._load_failures,
                memory_used_bytes=self._used_locked(),
                memory_budget_bytes=self._budget,
                max_models=self._config.max_models,
                evictions_by_reason=dict(self._evictions),
            )

    def _info_locked(self, entry: _Entry, own_leases: int = 0) -> LoadedModelInfo:
        return LoadedModelInfo(
            model_id=entry.model_id,
            kind=entry.kind,
            device=entry.device,
            compute_type=entry.compute_type,
            memory_bytes=entry.memory_bytes,
            loaded_at=entry.loaded_at,
            last_used=entry.last_used,
            hits=entry.hits,
            in_use=entry.refcount - own_leases,
            pinned=entry.pinned,
        )

    # -- memory watchdog ------------------------------------------------------------

    def _process_used(self) -> int:
        if self._device_type == "cuda":
            return self._probe.device_used_bytes(self._device)
        return self._probe.process_rss_bytes()

    def _memory_pressure(self) -> dict[str, int] | None:
        """The figures that exceed the watchdog threshold, or None when memory is fine."""
        threshold = self._config.watchdog_threshold
        grown = self._process_used() - self._baseline_used
        device_used = self._probe.device_used_bytes(self._device)
        if grown > threshold * self._budget or device_used > threshold * self._device_total:
            return {
                "process_growth_bytes": grown,
                "growth_limit_bytes": int(threshold * self._budget),
                "device_used_bytes": device_used,
                "device_limit_bytes": int(threshold * self._device_total),
            }
        return None

    def check_memory_once(self) -> list[str]:
        """Evict idle, unpinned models (least recently used first) while memory is over the threshold.

        "Over" means what the process has added since the cache was created (RSS on CPU,
        device memory in use on CUDA) exceeds watchdog_threshold x the budget, or the whole
        device is fuller than watchdog_threshold of its memory. Returns the evicted ids.
        """
        evicted: list[str] = []
        while (pressure := self._memory_pressure()) is not None:
            with self._lock:
                victim = next((e for e in self._entries.values() if not e.refcount and not e.pinned), None)
                if victim is not None:
                    self._evict_locked(victim, "watchdog")
            if victim is None:
                logger.warning("memory over the watchdog threshold and no model can be evicted", extra=pressure)
                break
            self._free([victim])
            evicted.append(victim.model_id)
        return evicted

    def start_watchdog(self) -> None:
        """Check memory every watchdog_interval_seconds in a daemon thread until stop()."""
        if self._watchdog is not None and self._watchdog.is_alive():
            return
        self._watchdog_stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="model-cache-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._watchdog_stop.wait(self._config.watchdog_interval_seconds):
            try:
                self.check_memory_once()
            except Exception:
                logger.exception("memory watchdog check failed")

    def stop(self) -> None:
        """Stop the watchdog thread (models stay loaded)."""
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None

    def close(self) -> None:
        """Stop the watchdog and unload every model (models in use close at their last release)."""
        self.stop()
        with self._lock:
            entries = list(self._entries.values())
            for entry in entries:
                self._evict_locked(entry, "unload")
                entry.detached = entry.refcount > 0
            idle = [e for e in entries if not e.detached]
        self._free(idle)
