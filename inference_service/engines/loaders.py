"""The model cache's loader: builds the engine of a model's kind from its files (the cache gets it from __main__)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from inference_service.engines.device import DeviceChoice
from inference_service.engines.schedulers import DecodeSchedulers
from inference_service.engines.whisper import DECODE_REPLICAS, WhisperEngine
from inference_service.model_cache.cache_types import LoadedModel, ModelSpec
from voxserve_common.errors import InvalidArgument
from voxserve_common.kinds import ModelKind


def make_loader(
    device: DeviceChoice,
    cpu_threads: int = 0,
    schedulers: DecodeSchedulers | None = None,
    decode_replicas: int = DECODE_REPLICAS,
) -> Callable[[ModelSpec], LoadedModel]:
    """The cache's load function: builds the right engine for the model's kind (a Whisper model
    with ``decode_replicas`` CTranslate2 replicas and its decode scheduler from ``schedulers``)."""

    def load(spec: ModelSpec) -> LoadedModel:
        if spec.kind == ModelKind.WHISPER:
            return WhisperEngine.load(spec.model_id, spec.path, device, cpu_threads, schedulers, decode_replicas)
        if spec.kind == ModelKind.VAD:
            from inference_service.engines.vad import SileroVadEngine

            return SileroVadEngine.load(spec.model_id, spec.path, device)
        if spec.kind == ModelKind.DEMUCS:
            from inference_service.engines.separation import DemucsSeparator

            return DemucsSeparator.load(spec.model_id, spec.path, device, name=_demucs_name(spec))
        if spec.kind == ModelKind.DIARIZATION:
            from inference_service.engines.diarization import SpeakerDiarizer

            return SpeakerDiarizer.load(spec.model_id, spec.path, device)
        raise InvalidArgument(f"model {spec.model_id!r} has kind {spec.kind!r}, which this service cannot load")

    return load


def _demucs_name(spec: ModelSpec) -> str | None:
    yamls = sorted(Path(spec.path).glob("*.yaml"))
    return yamls[0].stem if len(yamls) == 1 else spec.model_id
