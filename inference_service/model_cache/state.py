"""What the model cache knows, under one lock: loaded entries in LRU order, loads in flight, leases,
reservations, measurements, counters and limits."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from inference_service.errors import ModelInUse, ModelNotLoaded
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache.cache_types import (
    CacheEntry,
    CacheStats,
    Lease,
    LimitsChange,
    LoadedModelInfo,
    ModelSpec,
    kind_accepted,
    wrong_kind,
)
from inference_service.model_cache.loading import Closing, Flight, FlightResult, Participant
from inference_service.model_cache.policy import (
    EVICTION_REASONS,
    Measurements,
    estimate_footprint,
    evictable,
    held_over,
    held_reason,
    idle_expired,
    over_limits,
    plan_room,
    remember,
    reservation_full,
)
from inference_service.model_cache.reservations import Reservation
from voxserve_common.client_strings import shown
from voxserve_common.errors import InvalidArgument

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Joined:
    """An acquire that found no loaded model: it takes part in the model's flight (``leader``: it started it)."""

    flight: Flight
    participant: Participant
    leader: bool


class CacheState:
    """Everything the cache knows, behind one lock; each method is one whole transaction.

    Leases and reservations are made here and come back here (``release``), so the counts are
    never touched from outside. A method that evicts closes the models it evicted once the lock
    is released, through ``free`` (the loader's, under its load lock). ``budget`` and
    ``max_models`` are the limits in force. The policy (what to evict, what fits) is in policy.py.
    """

    def __init__(
        self,
        *,
        budget: int,
        max_models: int,
        free: Callable[[list[Closing]], None],
        metrics: InferenceMetrics | None,
        device_type: str,
    ) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self._flights: dict[str, Flight] = {}
        self._leased: dict[Lease, CacheEntry] = {}
        self._reservations: dict[Reservation, None] = {}  # memory held outside models (live streams)
        self._reserved = 0
        self._measured: dict[str, Measurements] = {}
        self._hits = self._misses = self._loads = self._load_failures = 0
        self._evictions: dict[str, int] = dict.fromkeys(EVICTION_REASONS, 0)
        self._budget = budget
        self._max_models = max_models
        self._free = free
        self._metrics = metrics
        self._device_type = device_type
        if metrics is not None:
            metrics.memory_budget_bytes.labels(device_type).set(budget)
            metrics.memory_used_bytes.labels(device_type).set(0)
            metrics.loaded_models.set(0)

    @property
    def budget(self) -> int:
        return self._budget

    @property
    def max_models(self) -> int:
        return self._max_models

    # -- leases ---------------------------------------------------------------------

    def checkout(self, model_id: str, expected_kind: str | None) -> Lease | Joined:
        """A lease on the loaded model (a hit), else a place in its flight (a miss).

        Raises WrongModelKind when the loaded model is not expected_kind (None accepts any).
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is not None:
                if not kind_accepted(expected_kind, entry.kind):
                    raise wrong_kind(model_id, entry.kind, expected_kind)
                lease = self._lease_locked(entry, cache_hit=True, load_seconds=0.0)
                self._hit_locked(entry)
                return lease
            flight = self._flights.get(model_id)
            leader = flight is None
            if flight is None:
                flight = self._flights[model_id] = Flight(model_id)
            self._misses += 1
            return Joined(flight, flight.join(expected_kind), leader)

    def touch(self, model_id: str, pin: bool) -> LoadedModelInfo | None:
        """Count a hit on a loaded model and mark it used (and pinned); None when it is not loaded."""
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                return None
            self._hit_locked(entry)
            if pin:
                entry.pinned = True
            info = entry.info()
            closing = self._detach_models(self._trim_locked())
        self._free(closing)
        return info

    def lease_info(self, lease: Lease, *, pin: bool) -> LoadedModelInfo:
        """The info of a leased model (its lease not counted as in use), pinned first if ``pin``."""
        with self._lock:
            entry = self._leased[lease]
            if pin:
                entry.pinned = True
            return entry.info(own_leases=1)

    def release(self, lease: Lease) -> None:
        """Take a lease back (once: later calls do nothing). A model unloaded with force closes at its
        last release; limits lowered while models were in use are met as they go idle."""
        with self._lock:
            entry = self._leased.pop(lease, None)
            if entry is None:
                return
            entry.refcount -= 1
            entry.last_used = time.time()
            if entry.detached and entry.refcount == 0:
                closing = self._detach_models([entry])
            else:
                closing = self._detach_models(self._trim_locked())
        self._free(closing)

    # -- loads ----------------------------------------------------------------------

    def estimate(self, spec: ModelSpec) -> int:
        with self._lock:
            return estimate_footprint(spec, self._measured.get(spec.model_id))

    def make_room(self, spec: ModelSpec) -> int:
        """Evict idle models, least recently used first, until the model fits; returns its estimate.

        Raises CacheFull (evicting nothing) when models that cannot be evicted leave no room.
        """
        with self._lock:
            estimate = estimate_footprint(spec, self._measured.get(spec.model_id))
            plan_figures = {"kind": spec.kind, "size_bytes": spec.size_bytes, "estimate_bytes": estimate}
            logger.debug("model load planned", extra={**plan_figures, **self._figures_locked()})
            plan = plan_room(list(self._entries.values()), spec, estimate, self._max_models, self._room_locked())
            for entry, reason in plan:
                self._evict_locked(entry, reason, "lru_for_room")
            closing = self._detach_models(entry for entry, _ in plan)
        self._free(closing)
        return estimate

    def settle_unwanted(self, flight: Flight, spec: ModelSpec) -> bool:
        """End the flight without a load when none of its participants accepts ``spec.kind``."""
        with self._lock:
            if flight.wanted_by(spec.kind):
                return False
            del self._flights[flight.model_id]
            flight.future.set_result(FlightResult(spec, 0.0))
            return True

    def add_loaded(self, flight: Flight, entry: CacheEntry, load_seconds: float) -> int:
        """Keep a freshly loaded model, lease it to each participant that accepts its kind, end
        the flight, and trim idle models to the limits; returns the memory now used."""
        model_id = entry.model_id
        with self._lock:
            self._entries[model_id] = entry
            for participant in flight.wanted_by(entry.kind):
                participant.lease = self._lease_locked(entry, cache_hit=False, load_seconds=load_seconds)
            del self._flights[model_id]
            self._measured[model_id] = remember(self._measured.get(model_id), entry.spec, entry.memory_bytes)
            self._loads += 1
            # The measurement may exceed the estimate, and SetCacheLimits may have lowered the
            # limits during the load: trim idle models to the limits in force again.
            closing = self._detach_models(self._trim_locked())
            used = self._used_locked()
            self._update_gauges_locked()
            flight.future.set_result(FlightResult(entry.spec, load_seconds))
        self._free(closing)
        return used

    def fail(self, flight: Flight) -> None:
        """Forget a flight that failed (its participants get the error through its future)."""
        with self._lock:
            self._flights.pop(flight.model_id, None)
            self._load_failures += 1

    # -- reservations ---------------------------------------------------------------

    def reserve(self, nbytes: int, label: str) -> Reservation:
        """Count ``nbytes`` as used, evicting idle, unpinned models (least recently used first)
        until models plus reservations fit the budget.

        Raises InvalidArgument for a negative size, CacheFull when they cannot fit even with
        every idle model evicted (nothing is reserved then; the evicted models stay evicted).
        """
        if nbytes < 0:
            raise InvalidArgument(f"a memory reservation cannot be negative, got {nbytes} bytes for {label}")
        reservation = Reservation(label, nbytes, self._unreserve)
        error = None
        with self._lock:
            self._reservations[reservation] = None
            self._reserved += nbytes
            entries = list(self._entries.values())
            plan = over_limits(entries, len(entries), self._room_locked())  # the budget alone
            for entry, reason in plan:
                self._evict_locked(entry, reason, "lru_for_reservation")
            used = self._used_locked()
            if used > self._budget:
                self._unreserve_locked(reservation)
                left = list(self._entries.values())
                error = reservation_full(
                    left, label, nbytes, used, self._budget, len(self._reservations), self._reserved
                )
                figures = {"memory_used_bytes": used - nbytes, "memory_budget_bytes": self._budget}
                logger.debug("memory reservation refused", extra={"label": label, "bytes": nbytes, **figures})
            self._update_gauges_locked()
            closing = self._detach_models(entry for entry, _ in plan)
        self._free(closing)
        if error is not None:
            raise error
        evicted = [entry.model_id for entry, _ in plan]
        logger.debug("memory reserved", extra={"label": label, "bytes": nbytes, "evicted": evicted})
        return reservation

    def _unreserve(self, reservation: Reservation) -> None:
        with self._lock:
            if self._unreserve_locked(reservation):
                self._update_gauges_locked()

    def _unreserve_locked(self, reservation: Reservation) -> bool:
        if reservation not in self._reservations:
            return False
        del self._reservations[reservation]
        self._reserved -= reservation.nbytes
        return True

    # -- eviction on request --------------------------------------------------------

    def unload(self, model_id: str, force: bool) -> LoadedModelInfo:
        """Evict a model now; with force, one in use leaves now and closes at its last release.

        Raises ModelNotLoaded, or ModelInUse when leases are held and not force.
        """
        with self._lock:
            entry = self._entries.get(model_id)
            if entry is None:
                loading = " (it is being loaded now)" if model_id in self._flights else ""
                raise ModelNotLoaded(f"model {shown(model_id)} is not loaded{loading}")
            if entry.refcount and not force:
                raise ModelInUse(
                    f"model {model_id!r} is in use by {entry.refcount} lease{'s' if entry.refcount != 1 else ''}; "
                    "retry when they finish, or unload with force to close it after them"
                )
            info = entry.info()
            closing = self._unload_locked([entry], "unload")
        self._free(closing)
        return info

    def unload_all(self) -> None:
        """Evict every model (models in use close at their last release)."""
        with self._lock:
            closing = self._unload_locked(list(self._entries.values()), "close")
        self._free(closing)

    def evict_idle(self) -> str | None:
        """Evict the least recently used idle, unpinned model for the watchdog; None when none is."""
        with self._lock:
            victim = next((e for e in self._entries.values() if evictable(e)), None)
            if victim is None:
                return None
            self._evict_locked(victim, "watchdog", "watchdog_pressure")
            closing = self._detach_models([victim])
        self._free(closing)
        return victim.model_id

    def expire_idle(self, ttl_seconds: float) -> list[str]:
        """Evict the idle, unpinned models unused for ``ttl_seconds`` (reason "idle"; 0: none); their ids."""
        with self._lock:
            expired = idle_expired(list(self._entries.values()), time.time(), ttl_seconds)
            for entry in expired:
                self._evict_locked(entry, "idle", "idle_ttl")
            closing = self._detach_models(expired)
        self._free(closing)
        return [entry.model_id for entry in expired]

    def set_limits(self, max_models: int | None, budget: int | None) -> tuple[LimitsChange, tuple[int, int], list[str]]:
        """Put new limits in force (None = unchanged) and evict idle models until they hold.

        Returns the change, the (max_models, budget) before it, and why each model that keeps
        the cache over the new limits is held.
        """
        with self._lock:
            before = (self._max_models, self._budget)
            self._max_models = max_models if max_models is not None else self._max_models
            self._budget = budget if budget is not None else self._budget
            if self._metrics is not None:
                self._metrics.memory_budget_bytes.labels(self._device_type).set(self._budget)
            evicted = self._trim_locked()
            over = held_over(list(self._entries.values()), self._max_models, self._room_locked())
            held = [f"{e.model_id} ({held_reason(e)})" for e in over]
            stats = self._stats_locked()
            change = LimitsChange(stats, tuple(e.model_id for e in evicted), tuple(e.model_id for e in over))
            closing = self._detach_models(evicted)
        self._free(closing)
        return change, before, held

    # -- snapshots ------------------------------------------------------------------

    def loaded(self) -> list[LoadedModelInfo]:
        with self._lock:
            return [e.info() for e in self._entries.values()]

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats_locked()

    # -- with the lock held ---------------------------------------------------------

    def _lease_locked(self, entry: CacheEntry, *, cache_hit: bool, load_seconds: float) -> Lease:
        assert entry.model is not None
        lease: Lease = Lease(
            entry.model,
            model_id=entry.model_id,
            kind=entry.kind,
            cache_hit=cache_hit,
            load_seconds=load_seconds,
            release=self.release,
        )
        self._leased[lease] = entry
        entry.refcount += 1
        return lease

    def _hit_locked(self, entry: CacheEntry) -> None:
        entry.hits += 1
        entry.last_used = time.time()
        self._entries.move_to_end(entry.model_id)
        self._hits += 1
        logger.debug("model cache hit", extra={"in_use": entry.refcount, "hits": entry.hits})
        if self._metrics is not None:
            self._metrics.cache_hits.labels(entry.model_id).inc()

    def _trim_locked(self) -> list[CacheEntry]:
        """Evict idle models until the limits in force hold; returns them."""
        plan = over_limits(list(self._entries.values()), self._max_models, self._room_locked())
        for victim, reason in plan:
            self._evict_locked(victim, reason, "limits")
        return [victim for victim, _ in plan]

    def _unload_locked(self, entries: list[CacheEntry], cause: str) -> list[Closing]:
        for entry in entries:
            self._evict_locked(entry, "unload", cause)
            entry.detached = entry.refcount > 0
        return self._detach_models(e for e in entries if not e.detached)

    def _evict_locked(self, entry: CacheEntry, reason: str, cause: str) -> None:
        """Take an entry out of the cache (its model is closed by the caller, or at its last release).

        ``reason`` is the metric's label; ``cause`` says which decision chose it (DEBUG).
        """
        decision = {"evicted_model_id": entry.model_id, "reason": reason, "cause": cause, "bytes": entry.memory_bytes}
        logger.debug("model eviction chosen", extra={**decision, **self._figures_locked()})
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

    @staticmethod
    def _detach_models(entries: Iterable[CacheEntry]) -> list[Closing]:
        """The models of evicted entries, taken out of them: the caller hands them to ``free``."""
        closing: list[Closing] = []
        for entry in entries:
            model, entry.model = entry.model, None
            if model is not None:
                closing.append((entry.model_id, model))
        return closing

    def _used_locked(self) -> int:
        return sum(e.memory_bytes for e in self._entries.values()) + self._reserved

    def _room_locked(self) -> int:
        """The budget left for models once the reservations are counted."""
        return self._budget - self._reserved

    def _figures_locked(self) -> dict[str, int]:
        """What a decision was made on, for its DEBUG record."""
        return {
            "memory_used_bytes": self._used_locked(),
            "room_bytes": self._room_locked(),
            "loaded_models": len(self._entries),
            "max_models": self._max_models,
        }

    def _update_gauges_locked(self) -> None:
        if self._metrics is None:
            return
        self._metrics.loaded_models.set(len(self._entries))
        self._metrics.memory_used_bytes.labels(self._device_type).set(self._used_locked())
        for entry in self._entries.values():
            self._metrics.loaded_model_bytes.labels(entry.model_id).set(entry.memory_bytes)

    def _stats_locked(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            evictions=sum(self._evictions.values()),
            loads=self._loads,
            load_failures=self._load_failures,
            memory_used_bytes=self._used_locked(),
            memory_budget_bytes=self._budget,
            max_models=self._max_models,
            evictions_by_reason=dict(self._evictions),
            loaded_models=len(self._entries),
        )
