"""Builds a tiny random Demucs bag in Demucs's hub layout, so tests load real files without the hub."""

from __future__ import annotations

import hashlib
import json
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import yaml
from demucs.htdemucs import HTDemucs
from safetensors.torch import save_file

SOURCES = ["drums", "bass", "other", "vocals"]
# Short training segment: each apply_model chunk is padded to this length, keeping tests fast.
SEGMENT = Fraction(12, 5)


def _encode_json(value: Any) -> Any:
    """Inverse of demucs.hf._decode_json: Fractions become {"_type": "fraction", ...}."""
    if isinstance(value, Fraction):
        return {"_type": "fraction", "numerator": value.numerator, "denominator": value.denominator}
    if isinstance(value, dict):
        return {key: _encode_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode_json(item) for item in value]
    return value


def export_tiny_demucs_bag(out_dir: Path, name: str = "tiny_htdemucs", seed: int = 0) -> Path:
    """Write ``{name}.yaml`` and ``{sig}.safetensors`` for a randomly initialised HTDemucs(channels=4) (~0.8 MB).

    The model keeps HTDemucs's default depth (a shallower one needs far more memory) and is
    exported the way demucs's ``tools/export_hf.py`` does: ``klass``/``args``/``kwargs`` JSON
    in the safetensors metadata. Returns the path of the yaml.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    # dconv_comp=4: the default (8) would give the residual branches 4 // 8 = 0 channels.
    model = HTDemucs(sources=SOURCES, channels=4, dconv_comp=4, segment=SEGMENT)
    args, kwargs = model._init_args_kwargs
    state = {key: tensor.detach().cpu().contiguous().clone() for key, tensor in model.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    sig = digest.hexdigest()[:8]
    klass = type(model)
    metadata = {
        "klass": f"{klass.__module__}.{klass.__qualname__}",
        "args": json.dumps(_encode_json(list(args))),
        "kwargs": json.dumps(_encode_json(dict(kwargs))),
    }
    save_file(state, str(out_dir / f"{sig}.safetensors"), metadata=metadata)
    bag_path = out_dir / f"{name}.yaml"
    bag_path.write_text(yaml.safe_dump({"models": [sig]}), encoding="utf-8")
    return bag_path


if __name__ == "__main__":
    print(export_tiny_demucs_bag(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_htdemucs")))
