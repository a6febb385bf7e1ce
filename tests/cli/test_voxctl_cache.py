"""voxctl cache set against the real inference service: the new limits, the evicted models, --json, errors."""

from __future__ import annotations

import json

import pytest

from tests.support import InferenceHandle
from voxctl.__main__ import main
from voxserve.inference.v1 import inference_pb2 as pb

GiB = 1 << 30


def run(capsys: pytest.CaptureFixture[str], handle: InferenceHandle, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["--store", handle.store.address, "--inference", handle.address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cache_set_prints_the_new_limits_and_the_evicted_models(capsys, start_inference) -> None:  # type: ignore[no-untyped-def]
    inference: InferenceHandle = start_inference(max_models=3)
    for model_id in ("silero-vad", "whisper-tiny.en"):
        inference.stub.LoadModel(pb.LoadModelRequest(model_id=model_id), timeout=120)

    code, out, err = run(capsys, inference, "cache", "set", "--max-models", "1", "--memory-budget", "3GiB")
    assert code == 0, err
    first, summary = out.splitlines()
    assert first == "limits: at most 1 models, 3.0 GiB budget; evicted: silero-vad"
    assert summary.startswith("cache: 1 of 1 models, ") and " of 3.0 GiB on cpu;" in summary
    stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)
    assert (stats.max_models, stats.memory_budget_bytes) == (1, 3 * GiB)

    code, out, err = run(capsys, inference, "--json", "cache", "set", "--max-models", "2")
    assert code == 0, err
    reply = json.loads(out)
    assert reply["evicted_model_ids"] == []
    assert reply["stats"]["max_models"] == 2 and reply["stats"]["memory_budget_bytes"] == 3 * GiB


def test_cache_set_errors(capsys, inference: InferenceHandle) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, inference, "cache", "set")
    assert code == 2 and "--max-models" in err and "--memory-budget" in err
    code, _, err = run(capsys, inference, "cache", "set", "--memory-budget", "plenty")
    assert code == 1 and "INVALID_ARGUMENT" in err and "memory_budget" in err
    code, _, err = run(capsys, inference, "cache", "set", "--max-models", "0")
    assert code == 1 and "INVALID_ARGUMENT" in err and "max_models" in err
    with pytest.raises(SystemExit) as caught:  # argparse: not an int32
        main(["--inference", inference.address, "cache", "set", "--max-models", str(2**40)])
    assert caught.value.code == 2
