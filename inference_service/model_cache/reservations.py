"""Memory the cache's budget must hold besides loaded models: what live streams keep while they last.

A live stream holds a Silero VAD state, its audio buffer and a decode's copy of it; the
live service holds an ONNX Runtime session of the VAD model besides the cached engine.
None of it is a cached model, yet N streams add up. A reservation counts such bytes in
the cache's used memory (stats, the memory_used gauge, the room a load must make), so
that the cache evicts idle models, or refuses with CacheFull, instead of overcommitting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from inference_service.errors import CacheFull
from inference_service.memory import format_bytes
from inference_service.model_cache.cache_types import CacheEntry
from inference_service.model_cache.eviction import evictable
from voxserve_common.errors import InvalidArgument

if TYPE_CHECKING:  # the registry holds a Reservations: no import cycle at run time
    from inference_service.model_cache.registry import CacheRegistry

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Reservation:
    """Bytes counted in the cache's used memory until ``release()`` (or the end of a ``with``)."""

    label: str
    nbytes: int
    _release: Callable[[Reservation], None] = field(repr=False)
    released: bool = False

    def release(self) -> None:
        """Stop counting the bytes; releasing twice is harmless."""
        self._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class Reservations:
    """The reservations held now; changed only with the registry's lock held."""

    def __init__(self) -> None:
        self._held: list[Reservation] = []
        self.total = 0

    def add_locked(self, reservation: Reservation) -> None:
        self._held.append(reservation)
        self.total += reservation.nbytes

    def remove_locked(self, reservation: Reservation) -> bool:
        if reservation.released:
            return False
        reservation.released = True
        self._held.remove(reservation)
        self.total -= reservation.nbytes
        return True

    def __len__(self) -> int:
        return len(self._held)


def reserve(reg: CacheRegistry, nbytes: int, label: str) -> Reservation:
    """Count ``nbytes`` in ``reg``'s used memory, evicting idle, unpinned models (least
    recently used first) until models plus reservations fit the budget.

    Raises:
        InvalidArgument: a negative size.
        CacheFull: they cannot fit even with every idle model evicted (nothing is reserved then).
    """
    if nbytes < 0:
        raise InvalidArgument(f"a memory reservation cannot be negative, got {nbytes} bytes for {label}")
    reservation = Reservation(label, nbytes, lambda r: _release(reg, r))
    victims: list[CacheEntry] = []
    with reg.lock:
        reg.reservations.add_locked(reservation)
        for entry in list(reg.entries.values()):
            if reg.used_locked() <= reg.budget:
                break
            if evictable(entry):
                reg.evict_locked(entry, "memory_budget")
                victims.append(entry)
        used = reg.used_locked()
        if used > reg.budget:
            reg.reservations.remove_locked(reservation)
            error = _full(reg, reservation, used)
        else:
            error = None
        reg.update_gauges_locked()
    reg.free(victims)
    if error is not None:
        raise error
    logger.debug("memory reserved", extra={"label": label, "bytes": nbytes, "evicted": [v.model_id for v in victims]})
    return reservation


def _release(reg: CacheRegistry, reservation: Reservation) -> None:
    with reg.lock:
        if reg.reservations.remove_locked(reservation):
            reg.update_gauges_locked()


def _full(reg: CacheRegistry, reservation: Reservation, used: int) -> CacheFull:
    held = [
        f"{e.model_id!r} {format_bytes(e.memory_bytes)} ({'pinned' if e.pinned else 'in use'})"
        for e in reg.entries.values()
    ]
    others = reg.reservations.total
    if others:
        held.append(f"{len(reg.reservations)} reservation(s) {format_bytes(others)}")
    return CacheFull(
        f"cannot hold {reservation.label}: it needs {format_bytes(reservation.nbytes)} and "
        f"{format_bytes(used - reservation.nbytes)} of the {format_bytes(reg.budget)} memory budget is held by "
        f"models that cannot be evicted and other reservations; held: {', '.join(held) or 'nothing'}. "
        "Retry when streams or jobs finish, unload or unpin a model, or raise the memory budget",
        model_id=reservation.label,
        estimate_bytes=reservation.nbytes,
        budget_bytes=reg.budget,
        held=held,
    )
