"""A load's measured footprint is never below a quarter of its files on disk: an RSS delta can come
out near zero when the load reuses pages freed earlier (CAM++ was once counted at 1 MiB instead of
about 59), and the cache would then think it had room it has not."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from inference_service.memory import MemoryProbe
from inference_service.model_cache.cache_types import ModelSpec
from inference_service.model_cache.loading import ModelLoader
from inference_service.model_cache.policy import MIN_MODEL_BYTES, footprint_floor
from voxserve_common.kinds import ModelKind

MiB = 1 << 20


class Held:
    """A loaded "model" holding ``size`` bytes of touched memory (0: nothing)."""

    kind: ClassVar[ModelKind] = ModelKind.DIARIZATION
    device = "cpu"
    compute_type = "float32"

    def __init__(self, size: int) -> None:
        self.block = bytearray(b"\1" * size) if size else bytearray()

    def close(self) -> None:
        self.block = bytearray()


def measure(spec: ModelSpec, holds: int) -> int:
    loader = ModelLoader(lambda _spec: Held(holds), MemoryProbe(), "cpu", warmup=False)
    measured = loader.load(spec, make_room=lambda: 0, report=lambda _progress: None)
    return measured.memory_bytes


def test_a_load_that_adds_nothing_is_counted_at_a_quarter_of_its_files(tmp_path: Path) -> None:
    spec = ModelSpec("campplus", "diarization", tmp_path, 400 * MiB)
    assert footprint_floor(spec) == 100 * MiB
    assert measure(spec, 0) == 100 * MiB


def test_a_real_delta_above_the_floor_is_kept(tmp_path: Path) -> None:
    spec = ModelSpec("campplus", "diarization", tmp_path, 4 * MiB)
    memory = measure(spec, 64 * MiB)
    assert memory >= 60 * MiB, memory  # the 64 MiB the load holds, not the 1 MiB floor


def test_small_files_keep_the_one_mib_floor(tmp_path: Path) -> None:
    spec = ModelSpec("tiny-vad", "vad", tmp_path, 2 * MiB)
    assert footprint_floor(spec) == MIN_MODEL_BYTES
    assert measure(spec, 0) == MIN_MODEL_BYTES
