"""Keeps loaded models in memory within a count limit and a memory budget, shared through leases.

``ModelCache`` (cache.py: the API, the flights, the watchdog) over one ``CacheState`` (state.py: one
lock, the entries, flights, leases, reservations and counters); the measured loads and the
single-flight in loading.py; eviction, limits, footprints and memory pressure as pure functions in
policy.py; the types callers use in cache_types.py and reservations.py.
"""

from __future__ import annotations

from inference_service.errors import CacheFull, ModelInUse, ModelLoadFailed, ModelNotLoaded, WrongModelKind
from inference_service.model_cache.cache import ModelCache
from inference_service.model_cache.cache_types import (
    CacheConfig,
    CacheStats,
    Lease,
    LimitsChange,
    LoadedModel,
    LoadedModelInfo,
    LoadProgress,
    ModelSpec,
    ProgressCallback,
)
from inference_service.model_cache.policy import FOOTPRINT_FACTORS
from inference_service.model_cache.reservations import Reservation

__all__ = [
    "FOOTPRINT_FACTORS",
    "CacheConfig",
    "CacheFull",
    "CacheStats",
    "Lease",
    "LimitsChange",
    "LoadProgress",
    "LoadedModel",
    "LoadedModelInfo",
    "ModelCache",
    "ModelInUse",
    "ModelLoadFailed",
    "ModelNotLoaded",
    "ModelSpec",
    "ProgressCallback",
    "Reservation",
    "WrongModelKind",
]
