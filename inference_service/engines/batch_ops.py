"""One batch of CTranslate2 Whisper calls: which calls may share a batch, and how their inputs are
stacked and their outputs split (numpy on the CPU, torch tensors on CUDA).

CTranslate2's ``encode`` and ``generate`` take a batch, but a batch has one set of options, one
input length, and (``generate``) every prompt must put ``<|startoftranscript|>`` at the same
position with as many task tokens after it ("The generate method currently requires the
<|startoftranscript|> token to be at the same position in all batches"). So a call's key holds
exactly what must be equal; calls with equal keys give, per item, the result they give alone
(on tiny.en int8 on the CPU: bit-identical encoder outputs, token ids and scores for batches of
2 items with beam 1 and 5, measured with this CTranslate2 4.8.5).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np

logger = logging.getLogger(__name__)

SOT_TOKEN = "<|startoftranscript|>"
SOT_PREV_TOKEN = "<|startofprev|>"
# The dtypes numpy and torch both read through the (CUDA) array interface; CTranslate2 has no
# array-interface type string for bfloat16, so a bfloat16 model runs every call alone.
STACKABLE_DTYPES = frozenset({"float32", "float16"})


class Op(enum.Enum):
    ENCODE = "encode"
    GENERATE = "generate"


@dataclass(frozen=True, eq=False)
class EncodeCall:
    """Mel features of one window, ``(1, n_mels, frames)`` float32 on the host."""

    features: np.ndarray
    to_cpu: bool


@dataclass(frozen=True, eq=False)
class GenerateCall:
    """One prompt over one encoder output (a ``StorageView`` of batch 1) with CTranslate2's options."""

    encoder_output: Any
    prompt: list[int]
    options: dict[str, Any]


def dtype_name(view: Any) -> str:
    """``"float16"`` for a StorageView of ``DataType.float16``."""
    return str(view.dtype).rsplit(".", 1)[-1]


def host_features(features: Any) -> np.ndarray:
    """The features of an ``encode`` call as a float32 ``(batch, n_mels, frames)`` host array
    (faster-whisper passes a CPU StorageView, the live decoder too; a CUDA one is copied over)."""
    if isinstance(features, np.ndarray):
        array = features
    elif getattr(features, "device", "cpu") == "cpu":
        array = np.asarray(features)
    else:
        import torch

        array = torch.as_tensor(features, device=f"cuda:{features.device_index}").cpu().numpy()
    if array.ndim == 2:
        array = array[None]
    return np.ascontiguousarray(array, dtype=np.float32)


def _frozen(value: Any) -> Hashable:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, float):
        return round(value, 9)
    return value if isinstance(value, Hashable) else repr(value)


def encode_key(call: EncodeCall) -> Hashable:
    """Windows of the same shape encode together: every 30 s file window, and live windows of one length."""
    return (Op.ENCODE, tuple(call.features.shape[1:]), call.to_cpu)


# Whisper's attention heads are 64 wide in every size (tiny: 384 = 6 heads; large: 1280 = 20).
HEAD_WIDTH = 64
SCORE_BYTES = 4  # float32 attention scores, whatever the compute type
FALLBACK_CACHE_BYTES = 32 << 20  # the L3 of the machine the budget was measured on
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class EncodeBudget:
    """How many windows of one length a CPU encoder batch may hold: while the self-attention
    scores of all its windows fit the last-level cache. Past that, one batch was slower than the
    same windows one by one (tiny.en int8, 2 EPYC cores, 32 MiB L3, ``bench/bench_encode_batch.py``:
    0.65-1.02x, where every batch within the budget gave 1.03-1.24x; docs/performance.md,
    "Encoder batches keep to the CPU's cache"). On a GPU batching pays at every length: no
    budget there.
    """

    cache_bytes: int
    heads: int

    def window_bytes(self, mel_frames: int) -> int:
        """One window's scores in one layer: (frames / 2)^2 per head (the encoder halves the frames)."""
        frames = (mel_frames + 1) // 2
        return frames * frames * self.heads * SCORE_BYTES

    def windows(self, mel_frames: int) -> int:
        """The most windows of this length one encoder call should take (at least 1: alone)."""
        return max(1, self.cache_bytes // max(1, self.window_bytes(mel_frames)))


def last_level_cache_bytes(caches: Path = CPU_CACHES) -> int:
    """The size of the CPU's last-level cache (sysfs), or FALLBACK_CACHE_BYTES when unknown."""
    best_level, best_size = 0, 0
    for index in caches.glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _cache_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and level > best_level:
            best_level, best_size = level, size
    return best_size or FALLBACK_CACHE_BYTES


def _cache_size(text: str) -> int:
    """``"32768K"`` -> bytes."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def encode_budget(model: Any) -> EncodeBudget | None:
    """The encoder budget of a CTranslate2 Whisper model on the CPU; None on a GPU. The model's
    width comes from encoding 2 mel frames of silence (10 ms on tiny)."""
    if getattr(model, "device", "cpu") != "cpu":
        return None
    silence = np.zeros((1, int(getattr(model, "n_mels", 80)), 2), np.float32)
    width = int(model.encode(ctranslate2.StorageView.from_array(silence), to_cpu=True).shape[-1])
    return EncodeBudget(last_level_cache_bytes(), max(1, width // HEAD_WIDTH))


def sot_index(prompt: Sequence[Any], sot_id: int) -> int:
    for index, token in enumerate(prompt):
        if token in (sot_id, SOT_TOKEN):
            return index
    return -1


def bucket_prompt(prompt: Sequence[Any], sot_id: int, sot_prev_id: int, step: int, cap: int) -> list[Any]:
    """``prompt`` with its previous text (``<|startofprev|>`` to ``<|startoftranscript|>``) cut at
    the oldest end to a multiple of ``step`` tokens, so that windows of different files put
    ``<|startoftranscript|>`` at one of a few positions and can share a decoder batch. A previous
    text shorter than ``step``, or at faster-whisper's ``cap`` (its last 223 tokens), stays whole;
    ``step`` 0 keeps every prompt as it is. The cut depends only on the prompt itself."""
    prompt = list(prompt)
    if step <= 0 or not prompt or prompt[0] not in (sot_prev_id, SOT_PREV_TOKEN):
        return prompt
    sot = sot_index(prompt, sot_id)
    previous = sot - 1
    if previous < step or previous >= cap:
        return prompt
    kept = previous // step * step
    return [prompt[0], *prompt[sot - kept :]]


def generate_key(call: GenerateCall, sot_id: int) -> Hashable | None:
    """Prompts laid out alike (``<|startoftranscript|>`` at the same index, as many tokens after it)
    over encoder outputs of one shape, dtype and device, with equal options; None for a call
    that cannot share a batch (an output that is itself a batch, or not stackable)."""
    output = call.encoder_output
    if output.shape[0] != 1 or dtype_name(output) not in STACKABLE_DTYPES:
        return None
    index = sot_index(call.prompt, sot_id)
    layout = (index, len(call.prompt) - index)
    where = (output.device, output.device_index, dtype_name(output), tuple(output.shape[1:]))
    return (Op.GENERATE, where, layout, _frozen(call.options))


def batchable(model: Any) -> bool:
    """Whether this model's encoder outputs can be split and stacked (not bfloat16, see STACKABLE_DTYPES)."""
    return "bfloat16" not in str(getattr(model, "compute_type", ""))


def run_encode(model: Any, calls: Sequence[EncodeCall]) -> list[Any]:
    """One ``encode`` for all calls (keys equal); each call's output as a StorageView of batch 1."""
    if len(calls) == 1:
        features = ctranslate2.StorageView.from_array(calls[0].features)
        return [model.encode(features, to_cpu=calls[0].to_cpu)]
    stacked = np.concatenate([call.features for call in calls])
    output = model.encode(ctranslate2.StorageView.from_array(stacked), to_cpu=calls[0].to_cpu)
    return split_batch(output, len(calls))


def run_generate(model: Any, calls: Sequence[GenerateCall]) -> list[Any]:
    """One ``generate`` for all calls (keys equal), a prompt per item; the results in call order."""
    if len(calls) == 1:
        call = calls[0]
        return list(model.generate(call.encoder_output, [call.prompt], **call.options))
    features = stack_batch([call.encoder_output for call in calls])
    return list(model.generate(features, [call.prompt for call in calls], **calls[0].options))


# --------------------------------------------------------------------------- stacking


def split_batch(output: Any, count: int, via_torch: bool = False) -> list[Any]:
    """Items of a batch StorageView as StorageViews of batch 1, each owning its memory (a copy:
    2.3 MB per 30 s window for tiny, 3.8 MB for large-v3 in float16; small beside a decode).
    CUDA outputs go through torch tensors (``via_torch`` takes that path on the CPU, for tests)."""
    if output.device == "cpu" and not via_torch:
        array = np.asarray(output)
        return [ctranslate2.StorageView.from_array(np.array(array[i : i + 1])) for i in range(count)]
    tensor = _as_tensor(output)
    parts = [tensor[i : i + 1].clone() for i in range(count)]
    _synchronize(tensor)
    return [_storage_from_tensor(part) for part in parts]


def stack_batch(outputs: Sequence[Any], via_torch: bool = False) -> Any:
    """StorageViews of batch 1 (same shape, dtype and device) as one batch StorageView."""
    if outputs[0].device == "cpu" and not via_torch:
        return ctranslate2.StorageView.from_array(np.concatenate([np.asarray(o) for o in outputs]))
    import torch

    stacked = torch.cat([_as_tensor(o) for o in outputs])
    _synchronize(stacked)
    return _storage_from_tensor(stacked)


def _as_tensor(view: Any) -> Any:
    """A torch tensor over a StorageView's memory (it keeps the view alive). CTranslate2 runs on
    its own CUDA stream, which torch's does not wait for: the device is synchronized first."""
    import torch

    if view.device == "cpu":
        return torch.from_numpy(np.asarray(view))
    device = torch.device("cuda", view.device_index)
    torch.cuda.synchronize(device)
    return torch.as_tensor(view, device=device)


def _synchronize(tensor: Any) -> None:
    """Wait for torch's copies before CTranslate2 (on another stream) reads them."""
    if tensor.is_cuda:
        import torch

        torch.cuda.synchronize(tensor.device)


def _storage_from_tensor(tensor: Any) -> Any:
    """A StorageView over a contiguous tensor's memory; ``from_array`` keeps the tensor alive."""
    if tensor.device.type == "cpu":
        return ctranslate2.StorageView.from_array(tensor.contiguous().numpy())
    return ctranslate2.StorageView.from_array(tensor.contiguous())
