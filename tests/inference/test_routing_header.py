"""The routing key: an x-voxserve-model header that names another model than the call uses is
INVALID_ARGUMENT (a proxy must never route on a value the service will not use); the right one, or
none, is fine."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from tests.support import DATA_DIR, InferenceHandle, transcribe
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.routing import MODEL_HEADER, model_metadata

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
DEFAULT = "whisper-tiny.en"


@pytest.fixture
def service(start_inference: Callable[..., InferenceHandle]) -> InferenceHandle:
    return start_inference(default_model=DEFAULT)


def refused(call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value.details() or ""


def test_a_header_naming_another_model_is_refused_before_any_work(service: InferenceHandle) -> None:
    other = model_metadata("whisper-base")
    details = refused(lambda: transcribe(service, SHORT, model_id=DEFAULT, metadata=other))
    assert f"the {MODEL_HEADER} header names model 'whisper-base' but the request uses 'whisper-tiny.en'" in details
    refused(lambda: transcribe(service, SHORT, metadata=other))  # empty model_id: the default is what is used

    def chunks() -> Iterator[pb.TranscribeChunk]:
        yield pb.TranscribeChunk(options=pb.TranscribeOptions(model_id=DEFAULT), audio=SHORT)

    refused(lambda: list(service.stub.TranscribeStream(chunks(), metadata=other, timeout=60)))
    refused(lambda: service.stub.LoadModel(pb.LoadModelRequest(model_id=DEFAULT), metadata=other, timeout=60))
    refused(lambda: service.stub.UnloadModel(pb.UnloadModelRequest(model_id=DEFAULT), metadata=other, timeout=60))

    def live() -> Iterator[pb.StreamingTranscribeRequest]:
        options = pb.TranscribeOptions(model_id=DEFAULT)
        yield pb.StreamingTranscribeRequest(
            config=pb.StreamingConfig(options=options, encoding=pb.LINEAR16, sample_rate_hertz=16000)
        )

    refused(lambda: list(service.stub.StreamingTranscribe(live(), metadata=other, timeout=60)))
    stats = service.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=10)
    assert (stats.loads, stats.misses) == (0, 0)  # nothing was loaded for a refused call


def test_the_header_of_the_model_used_or_none_is_fine(service: InferenceHandle) -> None:
    named = transcribe(service, SHORT, model_id=DEFAULT, metadata=model_metadata(DEFAULT))
    default = transcribe(service, SHORT, metadata=model_metadata(DEFAULT))  # the default model, named
    plain = transcribe(service, SHORT, model_id=DEFAULT)
    for events in (named, default, plain):
        assert events[-1].WhichOneof("event") == "completed"
    loaded = service.stub.LoadModel(pb.LoadModelRequest(model_id=DEFAULT), metadata=model_metadata(DEFAULT), timeout=60)
    assert loaded.model_id == DEFAULT
