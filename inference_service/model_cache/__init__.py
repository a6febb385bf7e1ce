"""Keeps loaded models in memory within a count limit and a memory budget, shared through leases.

``ModelCache`` (cache.py) over one registry (registry.py); loads in flight.py and loading.py,
eviction choices in eviction.py, run-time limit changes in limits.py, footprint estimates in footprint.py, the watchdog in
watchdog.py; the types callers use in cache_types.py.
"""

from __future__ import annotations

from inference_service.errors import CacheFull, ModelInUse, ModelLoadFailed, ModelNotLoaded, WrongModelKind
from inference_service.model_cache.cache import ModelCache
from inference_service.model_cache.cache_types import (
    CacheConfig,
    CacheStats,
    Lease,
    LoadedModel,
    LoadedModelInfo,
    LoadProgress,
    ModelSpec,
    ProgressCallback,
)
from inference_service.model_cache.footprint import FOOTPRINT_FACTORS
from inference_service.model_cache.limits import LimitsChange

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
    "WrongModelKind",
]
