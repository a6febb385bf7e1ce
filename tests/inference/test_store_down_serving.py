"""The model store down: a replica keeps serving the models whose files it has (its copy in cache_dir, or
the shared directory), loading them again if they were unloaded; a model it never had is UNAVAILABLE."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, StoreHandle, transcribe, word_error_rate
from voxserve.inference.v1 import inference_pb2 as pb

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
MODEL = "whisper-tiny.en"


def text_of(events: list[pb.TranscribeEvent]) -> str:
    return next(e.completed.text for e in events if e.WhichOneof("event") == "completed")


@pytest.mark.parametrize("store_access", ["fetch", "shared"])
def test_models_this_replica_has_keep_serving_while_the_store_is_down(
    store_access: str,
    start_store: Callable[..., StoreHandle],
    start_inference: Callable[..., InferenceHandle],
) -> None:
    store = start_store(import_embedded=True)
    inference = start_inference(store=store, store_access=store_access)
    inference.stub.LoadModel(pb.LoadModelRequest(model_id=MODEL), timeout=120)
    # Out of memory, its files still on this node: the next use loads it again from them.
    inference.stub.UnloadModel(pb.UnloadModelRequest(model_id=MODEL), timeout=30)
    store.stop()

    events = transcribe(inference, SHORT, model_id=MODEL)
    assert word_error_rate(TRANSCRIPTS["speech_short.wav"], text_of(events)) < 0.2
    completed = next(e.completed for e in events if e.WhichOneof("event") == "completed")
    assert not completed.cache_hit  # loaded again, without the store
    stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)
    assert stats.loads == 2

    with pytest.raises(grpc.RpcError) as caught:  # never resolved here: only the store knows it
        transcribe(inference, SHORT, model_id="test-tiny")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model store unreachable" in (caught.value.details() or "")
