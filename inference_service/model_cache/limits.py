"""Changing the cache's limits at run time: checking the new values and what must leave to meet them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_service.memory import parse_memory_budget
from inference_service.model_cache.cache_types import CacheEntry, CacheStats
from inference_service.model_cache.eviction import evictable
from voxserve_common.errors import InvalidArgument

# A limit is an int32 on the wire; more models than this is a typo, not a plan.
MAX_MODELS_LIMIT = 1000
MAX_BUDGET_BYTES = 1 << 60  # 1 EiB: beyond any device, and within CacheStats' int64
MAX_BUDGET_TEXT = 64  # characters; longer is not a budget (and is not echoed back whole)


@dataclass(frozen=True)
class NewLimits:
    """Checked new limits; None leaves a limit unchanged."""

    max_models: int | None
    memory_budget_bytes: int | None


@dataclass(frozen=True)
class LimitsChange:
    """What SetCacheLimits (or a SIGHUP) did.

    ``evicted``: idle, unpinned models evicted to meet the new limits, in eviction order.
    ``held_over``: models in use or pinned that keep the cache over the new limits; the limits
    are in force anyway (new loads respect them) and each of these models is evicted when it
    becomes idle while the cache is still over (pinned ones stay until unloaded or unpinned).
    """

    stats: CacheStats
    evicted: tuple[str, ...]
    held_over: tuple[str, ...]

    @property
    def over_limits(self) -> bool:
        return bool(self.held_over)


def check_limits(max_models: int | None, memory_budget: str | None, device_total: int) -> NewLimits:
    """Parse and check the requested limits; InvalidArgument naming the field otherwise.

    memory_budget is read like the memory_budget setting (bytes, "2GiB", or a percent of
    ``device_total``); None or "" leaves it unchanged.
    """
    if max_models is not None and not 1 <= max_models <= MAX_MODELS_LIMIT:
        raise InvalidArgument(f"max_models must be between 1 and {MAX_MODELS_LIMIT}, not {max_models}")
    budget = None
    if memory_budget:
        if len(memory_budget) > MAX_BUDGET_TEXT:
            raise InvalidArgument(
                f"memory_budget is {len(memory_budget)} characters long; use e.g. '2GiB', '80%' or a number of bytes"
            )
        try:
            budget = parse_memory_budget(memory_budget.strip(), device_total)
        except InvalidArgument as error:
            raise InvalidArgument(f"memory_budget: {error}") from None
        except (OverflowError, ValueError):
            budget = MAX_BUDGET_BYTES + 1
        if budget > MAX_BUDGET_BYTES:
            raise InvalidArgument(f"memory_budget {memory_budget!r} is more than 1 EiB; use e.g. '2GiB' or '80%'")
    return NewLimits(max_models, budget)


def over_limits(entries: Sequence[CacheEntry], max_models: int, budget: int) -> list[tuple[CacheEntry, str]]:
    """Idle, unpinned (entry, reason) evictions, least recently used first, until the entries
    hold at most max_models models and at most ``budget`` bytes (or nothing idle is left)."""
    count = len(entries)
    used = sum(e.memory_bytes for e in entries)
    plan: list[tuple[CacheEntry, str]] = []
    for entry in entries:
        if count <= max_models and used <= budget:
            break
        if not evictable(entry):
            continue
        plan.append((entry, "count_limit" if count > max_models else "memory_budget"))
        count -= 1
        used -= entry.memory_bytes
    return plan


def held_over(entries: Sequence[CacheEntry], max_models: int, budget: int) -> list[CacheEntry]:
    """The entries that cannot be evicted now, when the cache is over its limits; else []."""
    if len(entries) <= max_models and sum(e.memory_bytes for e in entries) <= budget:
        return []
    return [e for e in entries if not evictable(e)]
