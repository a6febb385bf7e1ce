"""How much memory a model takes once loaded: a factor of its files before its first load, then its measurements."""

from __future__ import annotations

import statistics
from collections.abc import Mapping

from inference_service.model_cache.cache_types import ModelSpec
from voxserve_common.kinds import ModelKind

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
FOOTPRINT_FACTORS: Mapping[ModelKind, float] = {ModelKind.WHISPER: 1.0, ModelKind.VAD: 4.0, ModelKind.DEMUCS: 2.0}
UNKNOWN_KIND_FACTOR = 2.0
# No model is accounted below this: an RSS delta can come out near zero when a load
# reuses pages freed earlier (or negative when another thread frees memory meanwhile).
MIN_MODEL_BYTES = 1 << 20
# Measurements per model_id whose median is its estimate: one outlier is outvoted once
# two more loads were measured.
MEASUREMENTS_KEPT = 3


class Footprints:
    """The last measured footprints per model_id; not thread-safe (the cache holds its lock)."""

    def __init__(self) -> None:
        # model_id -> (size_bytes on disk, the last measured footprints)
        self._measured: dict[str, tuple[int, tuple[int, ...]]] = {}

    def remember(self, spec: ModelSpec, measured: int) -> None:
        """Keep the last MEASUREMENTS_KEPT measurements of a model_id.

        An RSS delta also counts what other threads allocate during the load (a job
        decoding on another model); keeping the largest one forever let a single noisy
        load make a model look too big for the budget until a restart.
        """
        size, samples = self._measured.get(spec.model_id, (spec.size_bytes, ()))
        if size != spec.size_bytes:
            samples = ()
        self._measured[spec.model_id] = (spec.size_bytes, (*samples, measured)[-MEASUREMENTS_KEPT:])

    def estimate(self, spec: ModelSpec) -> int:
        """The median of the last loads of this model_id (while its size on disk is
        unchanged), else its size on disk times the factor of its kind."""
        measured = self._measured.get(spec.model_id)
        if measured is not None and measured[0] == spec.size_bytes and measured[1]:
            return int(statistics.median(measured[1]))
        factor = FOOTPRINT_FACTORS.get(spec.kind, UNKNOWN_KIND_FACTOR)
        return max(int(spec.size_bytes * factor), MIN_MODEL_BYTES)
