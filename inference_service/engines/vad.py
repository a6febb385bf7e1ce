"""Silero voice activity detection (ONNX), used to find where speech is in 16 kHz audio."""

from __future__ import annotations

import gc
import importlib
import importlib.resources
import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch

from inference_service.engines.device import DeviceChoice
from inference_service.errors import InvalidAudio, ModelFilesMissing, ModelLoadFailed
from voxserve_common.errors import FailedPrecondition
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
_import_lock = threading.Lock()


def import_silero_vad() -> ModuleType:
    """Import silero_vad without its side effect of ``torch.set_num_threads(1)`` for the process.

    silero_vad's model module pins torch to one thread at import; left alone that would
    slow every other torch model (Demucs) in this process.
    """
    with _import_lock:
        threads = torch.get_num_threads()
        try:
            module = importlib.import_module("silero_vad")
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return module


def packaged_silero_model_dir() -> Path:
    """The directory of model files shipped inside the silero-vad wheel (``silero_vad.onnx`` etc.)."""
    import_silero_vad()
    return Path(str(importlib.resources.files("silero_vad.data")))


def find_onnx_model(model_dir: Path) -> Path:
    """The first ``*.onnx`` under ``model_dir`` in path order (``model.onnx`` before ``model_fp16.onnx``).

    Raises:
        ModelFilesMissing: no ONNX file in the directory.
    """
    candidates = sorted(model_dir.rglob("*.onnx"), key=lambda p: (len(p.relative_to(model_dir).parts), str(p)))
    if not candidates:
        raise ModelFilesMissing(
            f"no *.onnx file under {model_dir}; a Silero VAD model needs its ONNX export "
            "(e.g. onnx/model.onnx or silero_vad.onnx)"
        )
    return candidates[0]


class SileroVadEngine:
    """A Silero VAD ONNX session; calls are serialised because the model keeps recurrent state."""

    kind: ClassVar[ModelKind] = ModelKind.VAD

    def __init__(self, model_id: str, model: Any, device: DeviceChoice, path: Path) -> None:
        self.model_id = model_id
        self.choice = device
        self.path = path
        self._model: Any | None = model
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_id: str, model_dir: Path | None, device: DeviceChoice) -> SileroVadEngine:
        """Load the ONNX model found under ``model_dir``, or the one shipped with silero-vad if None.

        ONNX Runtime runs on the CPU unless the device is CUDA and onnxruntime-gpu is installed.

        Raises:
            ModelFilesMissing: no ``*.onnx`` under ``model_dir``.
            ModelLoadFailed: ONNX Runtime rejected the file.
        """
        silero_vad = import_silero_vad()
        directory = model_dir if model_dir is not None else packaged_silero_model_dir()
        path = find_onnx_model(directory)
        try:
            model = silero_vad.utils_vad.OnnxWrapper(str(path), force_onnx_cpu=device.device == "cpu")
        except Exception as exc:
            raise ModelLoadFailed(f"loading silero VAD model {model_id!r} from {path} failed: {exc}") from exc
        logger.info("silero VAD model loaded", extra={"model_id": model_id, "path": str(path)})
        return cls(model_id, model, device, path)

    def speech_timestamps(
        self,
        audio16k: np.ndarray,
        threshold: float = 0.5,
        min_speech_duration_ms: int = 250,
        min_silence_duration_ms: int = 100,
        speech_pad_ms: int = 30,
    ) -> list[tuple[float, float]]:
        """Spans of speech as ``(start, end)`` seconds in 16 kHz mono audio, in order.

        Raises:
            InvalidAudio: the array is not 1-D.
            FailedPrecondition: the engine was closed.
        """
        if audio16k.ndim != 1:
            raise InvalidAudio(f"VAD needs 16 kHz mono audio of shape (samples,), got shape {audio16k.shape}")
        if audio16k.size == 0:
            return []
        silero_vad = import_silero_vad()
        samples = torch.from_numpy(np.ascontiguousarray(audio16k, dtype=np.float32))
        with self._lock:
            if self._model is None:
                raise FailedPrecondition(f"VAD model {self.model_id!r} was closed; load it again")
            spans = silero_vad.get_speech_timestamps(
                samples,
                self._model,
                threshold=threshold,
                sampling_rate=SAMPLE_RATE,
                min_speech_duration_ms=min_speech_duration_ms,
                min_silence_duration_ms=min_silence_duration_ms,
                speech_pad_ms=speech_pad_ms,
            )
        return [(span["start"] / SAMPLE_RATE, span["end"] / SAMPLE_RATE) for span in spans]

    @property
    def device(self) -> str:
        """Where the model runs ("cpu" or "cuda"), for the cache's listing."""
        return self.choice.device

    @property
    def compute_type(self) -> str:
        return "float32"

    def close(self) -> None:
        """Drop the ONNX session so its memory is freed now."""
        with self._lock:
            self._model = None
        gc.collect()
        logger.info("silero VAD model closed", extra={"model_id": self.model_id})
