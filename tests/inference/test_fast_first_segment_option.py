"""TranscribeOptions.fast_first_segment per request, on real speech, both ways and unset.

What tells the paths apart is the order of the events, not timing: with the option the
first utterance is decoded on its own and its segment is sent before the plain path has
even started (before the ``info`` event); without it ``info`` comes first.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, transcribe, word_error_rate
from voxserve.inference.v1 import inference_pb2 as pb

MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()
WER_BOUND = 0.2  # tiny.en on this file: ~0.02 both ways


def fast_path_taken(events: list[pb.TranscribeEvent]) -> bool:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "completed"
    segments = [e.segment for e in events if e.WhichOneof("event") == "segment"]
    assert [s.index for s in segments] == list(range(len(segments)))
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], " ".join(s.text for s in segments)) <= WER_BOUND
    fast = kinds.index("segment") < kinds.index("info")
    if fast:  # the first utterance alone, and the plain path resumed after it
        assert segments[0].text.lower().startswith("good morning") and segments[0].end <= 3.6
        assert all(later.start >= segments[0].end - 0.05 for later in segments[1:])
    return fast


def stream_chunks(options: pb.TranscribeOptions) -> Iterator[pb.TranscribeChunk]:
    yield pb.TranscribeChunk(options=options, audio=MULTI[: len(MULTI) // 2])
    yield pb.TranscribeChunk(audio=MULTI[len(MULTI) // 2 :])


def stream(handle: InferenceHandle, **options: Any) -> list[pb.TranscribeEvent]:
    return list(handle.stub.TranscribeStream(stream_chunks(pb.TranscribeOptions(**options)), timeout=300))


@pytest.fixture
def plain_service(start_inference: Any) -> InferenceHandle:
    handle: InferenceHandle = start_inference(fast_first_segment=False)
    return handle


def test_the_request_turns_it_on_over_a_service_that_has_it_off(plain_service: InferenceHandle) -> None:
    assert plain_service.config.fast_first_segment is False
    assert fast_path_taken(transcribe(plain_service, MULTI, fast_first_segment=True))
    assert fast_path_taken(stream(plain_service, fast_first_segment=True))
    # With vad_filter the speech spans are decoded as they are: the option is not used.
    assert not fast_path_taken(transcribe(plain_service, MULTI, fast_first_segment=True, vad_filter=True))


def test_unset_or_false_on_a_plain_service_is_the_plain_path(plain_service: InferenceHandle) -> None:
    assert not fast_path_taken(transcribe(plain_service, MULTI))
    assert not fast_path_taken(transcribe(plain_service, MULTI, fast_first_segment=False))
    assert not fast_path_taken(stream(plain_service))


def test_on_by_default_unset_follows_the_setting_and_false_turns_it_off(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference()
    assert handle.config.fast_first_segment is True
    assert fast_path_taken(transcribe(handle, MULTI))
    assert not fast_path_taken(transcribe(handle, MULTI, fast_first_segment=False))
    assert not fast_path_taken(stream(handle, fast_first_segment=False))


def test_a_retry_with_the_same_job_id_but_another_choice_is_a_different_request(
    plain_service: InferenceHandle,
) -> None:
    assert fast_path_taken(transcribe(plain_service, MULTI, job_id="ffs-1", fast_first_segment=True))
    with pytest.raises(grpc.RpcError) as info:
        transcribe(plain_service, MULTI, job_id="ffs-1", fast_first_segment=False)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
