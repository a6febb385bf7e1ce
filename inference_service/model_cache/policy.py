"""The cache's policy as pure functions: which idle models to evict, checking new limits, footprint estimates,
memory pressure.

Nothing here holds a lock or touches a model: the state (state.py) calls these with its entries,
least recently used first, and does what they decide.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inference_service.errors import CacheFull
from inference_service.memory import format_bytes, parse_memory_budget
from inference_service.model_cache.cache_types import CacheEntry, ModelSpec
from voxserve_common.errors import InvalidArgument
from voxserve_common.kinds import ModelKind

# The label of voxserve_cache_evictions_total: count_limit (LRU eviction for max_models),
# memory_budget (LRU eviction for the budget), watchdog (memory pressure), idle (unused for
# model_idle_ttl_seconds), unload (UnloadModel, an admin's call, and shutdown).
EVICTION_REASONS = ("count_limit", "memory_budget", "watchdog", "idle", "unload")

# -- eviction -------------------------------------------------------------------------


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


def reservation_full(
    entries: Sequence[CacheEntry], label: str, nbytes: int, used: int, budget: int, others: int, other_bytes: int
) -> CacheFull:
    """The error for a reservation of ``nbytes`` that does not fit: ``used`` counts it, the models
    left (none of them evictable) and the ``others`` reservations of ``other_bytes``."""
    held = [f"{e.model_id!r} {format_bytes(e.memory_bytes)} ({'pinned' if e.pinned else 'in use'})" for e in entries]
    if other_bytes:
        held.append(f"{others} reservation(s) {format_bytes(other_bytes)}")
    return CacheFull(
        f"cannot hold {label}: it needs {format_bytes(nbytes)} and "
        f"{format_bytes(used - nbytes)} of the {format_bytes(budget)} memory budget is held by "
        f"models that cannot be evicted and other reservations; held: {', '.join(held) or 'nothing'}. "
        "Retry when streams or jobs finish, unload or unpin a model, or raise the memory budget",
        model_id=label,
        estimate_bytes=nbytes,
        budget_bytes=budget,
        held=held,
    )


# -- limits ---------------------------------------------------------------------------

# A limit is an int32 on the wire; more models than this is a typo, not a plan.
MAX_MODELS_LIMIT = 1000
MAX_BUDGET_BYTES = 1 << 60  # 1 EiB: beyond any device, and within CacheStats' int64
MAX_BUDGET_TEXT = 64  # characters; longer is not a budget (and is not echoed back whole)


@dataclass(frozen=True)
class NewLimits:
    """Checked new limits; None leaves a limit unchanged."""

    max_models: int | None
    memory_budget_bytes: int | None


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


def idle_expired(entries: Sequence[CacheEntry], now: float, ttl_seconds: float) -> list[CacheEntry]:
    """The idle, unpinned entries nobody used for ``ttl_seconds`` or more at ``now`` (wall-clock
    seconds, as ``last_used``); none when ttl_seconds is 0 (idle unload off)."""
    if ttl_seconds <= 0:
        return []
    return [e for e in entries if evictable(e) and now - e.last_used >= ttl_seconds]


def held_over(entries: Sequence[CacheEntry], max_models: int, budget: int) -> list[CacheEntry]:
    """The entries that cannot be evicted now, when the cache is over its limits; else []."""
    if len(entries) <= max_models and sum(e.memory_bytes for e in entries) <= budget:
        return []
    return [e for e in entries if not evictable(e)]


def held_reason(entry: CacheEntry) -> str:
    """Why the cache may not evict an entry: "pinned", "in use by N", or both."""
    reasons = (["pinned"] if entry.pinned else []) + ([f"in use by {entry.refcount}"] if entry.refcount else [])
    return ", ".join(reasons)


# -- footprints -----------------------------------------------------------------------

# Memory a loaded model takes, as a multiple of its files on disk, for a model_id the
# cache has never loaded (afterwards the measured bytes of that model_id are used).
# Measured on CPU (RSS delta around the load, psutil), 2 cores, torch 2.13 / CT2 4.8.5:
# - whisper: tiny.en CTranslate2 (float16 model.bin 75.5 MB, 78 MB with the tokenizer)
#   with compute_type=int8 took 51-55 MiB (0.7x) with freed memory returned to the OS
#   before and after the load (as the cache does), 66-91 MiB without the trim after it
#   (74-77 MiB, 1.0x, on a later VM of the same kind, with the mmap threshold pinned);
#   float32 took 155 MiB (2x). 1.0x fits int8, the project's CPU default, with room to
#   spare; a float32/float16 load is corrected by its first measurement.
# - vad: Silero VAD 6.2.3 as shipped: JIT (2.3 MB) 3.9 MiB (1.7x); ONNX (2.3 MB) 21.7 MiB
#   on its first onnxruntime session (9x), nothing for later ones. 4x.
# - demucs: safetensors exports of HDemucs/HTDemucs (2.3-46 MB) hold their weights once
#   loaded (~1x) but briefly hold them twice during load_safetensors_model (the file's
#   tensors and the module's), so 2x.
# - diarization: the CAM++ checkpoint (28.0 MB) took 58.7 MiB after its load and warm-up
#   (2.2x: the state dict and the module's copy meet during load_state_dict), so 2.5x.
FOOTPRINT_FACTORS: Mapping[ModelKind, float] = {
    ModelKind.WHISPER: 1.0,
    ModelKind.VAD: 4.0,
    ModelKind.DEMUCS: 2.0,
    ModelKind.DIARIZATION: 2.5,
}
UNKNOWN_KIND_FACTOR = 2.0
# No model is accounted below this: an RSS delta can come out near zero when a load
# reuses pages freed earlier (or negative when another thread frees memory meanwhile).
MIN_MODEL_BYTES = 1 << 20
# Nor below this share of its files on disk: a loaded model holds at least its weights, and the
# smallest ratio among the kinds is int8 weights converted from a float32 file (a quarter).
# A CI run measured CAM++ (28 MB on disk, about 59 MiB loaded) at the 1 MiB floor once, and
# the cache then counted it at 1 MiB until later loads outvoted that sample.
MIN_SHARE_OF_FILES = 0.25
# Measurements per model_id whose median is its estimate: one outlier is outvoted once
# two more loads were measured.
MEASUREMENTS_KEPT = 3


@dataclass(frozen=True)
class Measurements:
    """The last measured footprints of one model_id, while its files had ``size_bytes`` on disk."""

    size_bytes: int
    samples: tuple[int, ...]


def remember(previous: Measurements | None, spec: ModelSpec, measured: int) -> Measurements:
    """The last MEASUREMENTS_KEPT measurements once ``measured`` is added (a new size on disk starts over).

    An RSS delta also counts what other threads allocate during the load (a job decoding on
    another model); keeping the largest one forever let a single noisy load make a model
    look too big for the budget until a restart.
    """
    samples = previous.samples if previous is not None and previous.size_bytes == spec.size_bytes else ()
    return Measurements(spec.size_bytes, (*samples, measured)[-MEASUREMENTS_KEPT:])


def footprint_floor(spec: ModelSpec) -> int:
    """The least a load of ``spec`` is accounted at, whatever its RSS delta said."""
    return max(int(spec.size_bytes * MIN_SHARE_OF_FILES), MIN_MODEL_BYTES)


def estimate_footprint(spec: ModelSpec, measured: Measurements | None) -> int:
    """The median of the last loads of this model_id (while its size on disk is
    unchanged), else its size on disk times the factor of its kind."""
    if measured is not None and measured.size_bytes == spec.size_bytes and measured.samples:
        return int(statistics.median(measured.samples))
    factor = FOOTPRINT_FACTORS.get(spec.kind, UNKNOWN_KIND_FACTOR)
    return max(int(spec.size_bytes * factor), MIN_MODEL_BYTES)


# -- memory pressure ------------------------------------------------------------------


def memory_pressure(
    grown: int, device_used: int, *, budget: int, device_total: int, threshold: float
) -> dict[str, int] | None:
    """The figures that exceed the threshold, or None when memory is fine.

    "Exceed" means what the process has added since the cache started (``grown``) passes
    threshold x the budget, or the whole device is fuller than threshold of its memory.
    """
    if grown > threshold * budget or device_used > threshold * device_total:
        return {
            "process_growth_bytes": grown,
            "growth_limit_bytes": int(threshold * budget),
            "device_used_bytes": device_used,
            "device_limit_bytes": int(threshold * device_total),
        }
    return None
