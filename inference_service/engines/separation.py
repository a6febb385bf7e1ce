"""Demucs source separation, used to isolate vocals from music/noise before transcription."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from demucs.apply import BagOfModels, apply_model
from demucs.hf import load_safetensors_model

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray, decode_audio, resample, to_mono
from inference_service.engines.device import DeviceChoice
from inference_service.errors import InvalidAudio, InvalidOptions, ModelFilesMissing, ModelLoadFailed
from voxserve_common.errors import Cancelled, FailedPrecondition
from voxserve_common.kinds import ModelKind

logger = logging.getLogger(__name__)

VOCALS = "vocals"


def _never() -> bool:
    return False


def find_bag_yaml(model_dir: Path, name: str | None) -> Path:
    """The bag definition ``{name}.yaml``, or the only ``*.yaml`` in ``model_dir`` when name is None.

    Raises:
        ModelFilesMissing: the named yaml is absent, or name is None and there is not exactly one.
    """
    if name is not None:
        path = model_dir / f"{name}.yaml"
        if not path.is_file():
            raise ModelFilesMissing(f"Demucs bag {name}.yaml not found in {model_dir}")
        return path
    found = sorted(model_dir.glob("*.yaml"))
    if len(found) != 1:
        names = ", ".join(p.stem for p in found) or "none"
        raise ModelFilesMissing(
            f"expected exactly one Demucs bag *.yaml in {model_dir}, found {names}; name the bag to load"
        )
    return found[0]


class DemucsSeparator:
    """A Demucs bag of models on one device; separation runs under ``torch.inference_mode``."""

    kind: ClassVar[ModelKind] = ModelKind.DEMUCS

    def __init__(self, model_id: str, bag: BagOfModels, device: DeviceChoice) -> None:
        self.model_id = model_id
        self.choice = device
        self._bag: BagOfModels | None = bag

    @classmethod
    def load(cls, model_id: str, model_dir: Path, device: DeviceChoice, name: str | None = None) -> DemucsSeparator:
        """Load a bag in Demucs's hub layout: ``{name}.yaml`` plus one ``{sig}.safetensors`` per model.

        Raises:
            ModelFilesMissing: no usable yaml, or a listed ``{sig}.safetensors`` is absent.
            ModelLoadFailed: the yaml or a safetensors file is malformed, or the models disagree.
        """
        bag_path = find_bag_yaml(model_dir, name)
        try:
            spec = yaml.safe_load(bag_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ModelLoadFailed(f"reading Demucs bag {bag_path} failed: {exc}") from exc
        if not isinstance(spec, dict) or not isinstance(spec.get("models"), list) or not spec["models"]:
            raise ModelLoadFailed(f"Demucs bag {bag_path} has no 'models' list of signatures")
        paths = [model_dir / f"{sig}.safetensors" for sig in spec["models"]]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ModelFilesMissing(f"Demucs bag {bag_path.name} lists {', '.join(missing)}, absent in {model_dir}")
        try:
            models = [load_safetensors_model(p) for p in paths]
            bag = BagOfModels(models, spec.get("weights"), spec.get("segment"))
            bag.eval()
            bag.to(device.device)
        except Exception as exc:
            raise ModelLoadFailed(f"loading Demucs model {model_id!r} from {model_dir} failed: {exc}") from exc
        logger.info("demucs model loaded", extra={"model_id": model_id, "models": len(models)})
        return cls(model_id, bag, device)

    def _loaded(self) -> BagOfModels:
        if self._bag is None:
            raise FailedPrecondition(f"Demucs model {self.model_id!r} was closed; load it again")
        return self._bag

    @property
    def samplerate(self) -> int:
        """The rate the model was trained at (44100 for the published models)."""
        return int(self._loaded().samplerate)

    @property
    def audio_channels(self) -> int:
        """Channels the model expects (2 for the published models)."""
        return int(self._loaded().audio_channels)

    @property
    def sources(self) -> list[str]:
        """Stem names in output order, e.g. drums, bass, other, vocals."""
        return list(self._loaded().sources)

    def decode_for_model(self, data: bytes) -> FloatArray:
        """Decode uploaded bytes to ``(audio_channels, samples)`` at the model's rate (see decode_audio)."""
        audio = decode_audio(data, sampling_rate=self.samplerate, channels=self.audio_channels)
        return audio[None] if audio.ndim == 1 else audio

    def vocals_for_whisper(self, vocals: np.ndarray) -> FloatArray:
        """Turn a vocals stem at the model's rate into 16 kHz mono, what Whisper and the VAD take."""
        return resample(to_mono(vocals), self.samplerate, WHISPER_SAMPLE_RATE)

    def separate_vocals(
        self,
        audio: np.ndarray,
        should_stop: Callable[[], bool] = _never,
        overlap: float = 0.1,
    ) -> FloatArray:
        """Return the vocals stem of ``(channels, samples)`` float32 audio at ``samplerate``, same shape.

        ``should_stop`` is polled before the work and before each ~segment-long chunk, so a
        cancelled request does not keep a core busy for the rest of the file.

        Raises:
            InvalidAudio: wrong shape or channel count, or no samples.
            InvalidOptions: the model has no vocals stem.
            Cancelled: ``should_stop()`` returned True.
        """
        bag = self._loaded()
        if VOCALS not in bag.sources:
            raise InvalidOptions(
                f"Demucs model {self.model_id!r} has no {VOCALS!r} stem (it has {', '.join(bag.sources)}); "
                "use a vocals model such as htdemucs"
            )
        channels = int(bag.audio_channels)
        if audio.ndim != 2 or audio.shape[0] != channels or audio.shape[1] == 0:
            raise InvalidAudio(
                f"Demucs model {self.model_id!r} needs ({channels}, samples) audio at {bag.samplerate} Hz, "
                f"got shape {audio.shape}; decode with decode_audio(data, {bag.samplerate}, {channels})"
            )

        def check_stop(_: dict[str, Any]) -> None:
            if should_stop():
                raise Cancelled("source separation was cancelled")

        check_stop({})
        mix = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        ref = mix.mean(0)
        mean, std = ref.mean(), ref.std() + 1e-8
        with torch.inference_mode():
            stems = apply_model(
                bag,
                ((mix - mean) / std)[None],
                shifts=0,
                split=True,
                overlap=overlap,
                progress=False,
                device=self.choice.device,
                callback=check_stop,
            )[0]
            vocals = stems[bag.sources.index(VOCALS)] * std + mean
        return np.ascontiguousarray(vocals.cpu().numpy(), dtype=np.float32)

    @property
    def device(self) -> str:
        """Where the model runs ("cpu" or "cuda"), for the cache's listing."""
        return self.choice.device

    @property
    def compute_type(self) -> str:
        return "float32"

    def close(self) -> None:
        """Free the weights now (and CUDA's cached blocks) rather than at the next GC."""
        if self._bag is None:
            return
        self._bag = None
        gc.collect()
        if self.choice.device == "cuda":
            torch.cuda.empty_cache()
        logger.info("demucs model closed", extra={"model_id": self.model_id})
