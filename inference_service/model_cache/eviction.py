"""Which idle models to evict, least recently used first, so that a model fits the cache's limits."""

from __future__ import annotations

from collections.abc import Sequence

from inference_service.errors import CacheFull
from inference_service.memory import format_bytes
from inference_service.model_cache.cache_types import CacheEntry, ModelSpec

EVICTION_REASONS = ("count_limit", "memory_budget", "watchdog", "unload")


def evictable(entry: CacheEntry) -> bool:
    """Neither pinned nor leased: the only models the cache may drop by itself."""
    return not entry.refcount and not entry.pinned


def plan_room(
    entries: Sequence[CacheEntry], spec: ModelSpec, estimate: int, max_models: int, budget: int
) -> list[tuple[CacheEntry, str]]:
    """The (entry, reason) evictions, LRU first, after which one more model of ``estimate``
    bytes fits within max_models and the budget; entries are least recently used first.

    Raises CacheFull when even evicting every idle, unpinned model is not enough.
    """
    count = len(entries)
    used = sum(e.memory_bytes for e in entries)

    def fits() -> bool:
        return count + 1 <= max_models and used + estimate <= budget

    plan: list[tuple[CacheEntry, str]] = []
    for entry in entries:
        if fits():
            break
        if not evictable(entry):
            continue
        plan.append((entry, "count_limit" if count + 1 > max_models else "memory_budget"))
        count -= 1
        used -= entry.memory_bytes
    if not fits():
        raise cache_full(entries, spec, estimate, count, used, max_models, budget)
    return plan


def cache_full(
    entries: Sequence[CacheEntry], spec: ModelSpec, estimate: int, count: int, used: int, max_models: int, budget: int
) -> CacheFull:
    """The error that says what holds the cache and what the caller can do about it."""
    held = []
    for e in entries:
        if e.refcount or e.pinned:
            why = []
            if e.pinned:
                why.append("pinned")
            if e.refcount:
                why.append(f"in use by {e.refcount} lease{'s' if e.refcount != 1 else ''}")
            held.append(f"{e.model_id!r} {format_bytes(e.memory_bytes)} ({', '.join(why)})")
    problems = []
    if estimate > budget:
        problems.append(f"it alone exceeds the memory budget of {format_bytes(budget)}")
    elif used + estimate > budget:
        problems.append(
            f"{format_bytes(used)} of the {format_bytes(budget)} memory budget is held by models that cannot be evicted"
        )
    if count + 1 > max_models:
        problems.append(f"{count} of at most {max_models} models cannot be evicted")
    message = (
        f"cannot load model {spec.model_id!r}: it needs about {format_bytes(estimate)} and "
        f"{' and '.join(problems)}; held: {', '.join(held) if held else 'nothing'}. "
        "Retry when leases are released, unload or unpin a model, or raise the limits"
    )
    return CacheFull(message, model_id=spec.model_id, estimate_bytes=estimate, budget_bytes=budget, held=held)
