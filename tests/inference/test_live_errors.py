"""StreamingTranscribe refuses bad configs with INVALID_ARGUMENT, and says when it cannot keep up."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest

from inference_service.engines import buffer_decoder as live_decoder
from tests.inference.test_live_stream import MULTI, TRANSCRIPTS, config, final_text, in_use, pcm, results, stream
from tests.support import InferenceHandle, wait_for, word_error_rate
from voxctl.live import live_requests
from voxserve.inference.v1 import inference_pb2 as pb


def call(handle: InferenceHandle, messages: list[pb.StreamingTranscribeRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        list(handle.stub.StreamingTranscribe(iter(messages), timeout=60))
    return error.value


AUDIO = pb.StreamingTranscribeRequest(audio=b"\x00\x00" * 1600)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([AUDIO, AUDIO], "first StreamingTranscribeRequest must carry a config"),
        ([], "no messages"),
        ([pb.StreamingTranscribeRequest(config=config(encoding=pb.AUDIO_ENCODING_UNSPECIFIED)), AUDIO], "encoding"),
        ([pb.StreamingTranscribeRequest(config=config(encoding=7)), AUDIO], "encoding"),
        ([pb.StreamingTranscribeRequest(config=config(rate=0)), AUDIO], "sample_rate_hertz"),
        ([pb.StreamingTranscribeRequest(config=config(rate=1000)), AUDIO], "sample_rate_hertz"),
        ([pb.StreamingTranscribeRequest(config=config(channels=-1)), AUDIO], "channels"),
        ([pb.StreamingTranscribeRequest(config=config(endpoint_silence_seconds=-1)), AUDIO], "endpoint_silence"),
        (
            [pb.StreamingTranscribeRequest(config=config(options=pb.TranscribeOptions(language="xx"))), AUDIO],
            "language",
        ),
        (
            [pb.StreamingTranscribeRequest(config=config()), AUDIO, pb.StreamingTranscribeRequest(config=config())],
            "only the first",
        ),
    ],
    ids=[
        "audio-before-config",
        "empty-stream",
        "encoding-unspecified",
        "encoding-unknown",
        "rate-zero",
        "rate-too-low",
        "channels-negative",
        "endpoint-negative",
        "language-unknown",
        "second-config",
    ],
)
def test_bad_config_is_invalid_argument(inference: InferenceHandle, messages: list[Any], needle: str) -> None:
    error = call(inference, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert needle in error.details()
    wait_for(lambda: inference.app.live.active() == 0, timeout=10, message="stream ended")
    assert in_use(inference) == 0


def test_unknown_model_is_not_found(inference: InferenceHandle) -> None:
    cfg = config(options=pb.TranscribeOptions(model_id="no-such-model"))
    error = call(inference, [pb.StreamingTranscribeRequest(config=cfg), AUDIO])
    assert error.code() == grpc.StatusCode.NOT_FOUND


class SlowDecodes:
    """Every live decode takes ``delay`` seconds more (a slower machine or a bigger model);
    records how much new audio each decode covered."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, delay: float) -> None:
        self.delay = delay
        self.lengths: list[float] = []
        original = live_decoder.BufferDecoder.decode

        def slow(
            decoder: live_decoder.BufferDecoder, audio: Any, prompt: str, final: bool = False
        ) -> live_decoder.Hypothesis:
            time.sleep(self.delay)
            self.lengths.append(audio.shape[0] / 16000)
            return original(decoder, audio, prompt, final)

        monkeypatch.setattr(live_decoder.BufferDecoder, "decode", slow)


def test_a_slow_engine_decodes_less_often_and_still_finishes(
    inference: InferenceHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow = SlowDecodes(monkeypatch, delay=0.8)
    audio = pcm(MULTI)
    duration = len(audio) / 2 / 16000
    responses = stream(inference, audio, 2.0, config(max_lag_seconds=1.0))
    assert responses[-1].WhichOneof("event") == "completed"
    lags = [r.audio_received_seconds - r.audio_processed_seconds for r in responses]
    assert max(lags) > 1.0, "the slowed engine should have fallen behind"
    # Fewer decodes than the 0.3 s cadence would need, each on more audio: at 2x with
    # 0.8 s per decode, a decode covers >= 1.6 s of new audio.
    assert len(slow.lengths) < duration / 0.3 / 2
    assert word_error_rate(TRANSCRIPTS[MULTI], final_text(responses)) <= 0.2
    assert any(r.is_final for _, r in results(responses))


def test_a_stream_that_cannot_be_served_ends_with_resource_exhausted(
    start_inference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = start_inference(live_max_lag_seconds=0.5, live_abandon_lag_seconds=2.0)
    SlowDecodes(monkeypatch, delay=3.0)
    with pytest.raises(grpc.RpcError) as error:
        list(handle.stub.StreamingTranscribe(live_requests(config(), pcm(MULTI), 4.0), timeout=120))
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "behind the audio" in error.value.details()
    wait_for(lambda: in_use(handle) == 0, timeout=10, message="lease freed after the decode in flight")
    registry = handle.app.metrics.registry
    assert registry.get_sample_value("voxserve_live_streams_finished_total", {"outcome": "overloaded"}) == 1
