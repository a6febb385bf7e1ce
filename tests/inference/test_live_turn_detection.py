"""The turn-detection settings a live stream may set (StreamingConfig.speech_threshold and
speech_pad_seconds, what OpenAI's turn_detection threshold and prefix_padding_ms map to):
the session starts speech at the threshold, keeps the pad before it, and bad values are
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.engines.speech_detector import CHUNK
from inference_service.live.service import LiveLimits, LiveService, StreamRequest
from inference_service.live.session import SPEECH_PAD, LiveSession, LiveSettings, SpeechEvent
from inference_service.wire import stream_request_from_config
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.errors import InvalidArgument

STEP = CHUNK / 16000


def started(session: LiveSession, probability: float, seconds: float = 0.5) -> list[SpeechEvent]:
    steps = round(seconds / STEP)
    events = session.push(np.zeros(steps * CHUNK, np.float32), [probability] * steps)
    return [e for e in events if isinstance(e, SpeechEvent)]


def test_speech_starts_at_the_threshold_the_stream_set() -> None:
    assert started(LiveSession(LiveSettings()), 0.6) != []
    assert started(LiveSession(LiveSettings(speech_threshold=0.8)), 0.6) == []
    assert started(LiveSession(LiveSettings(speech_threshold=0.8)), 0.85) != []


def test_the_pad_before_a_speech_start_is_kept_in_the_buffer() -> None:
    for pad in (0.0, 0.5):
        session = LiveSession(LiveSettings(speech_pad=pad))
        started(session, 0.0, 2.0)  # silence: only the pad is kept
        (speech,) = started(session, 0.9, 0.5)
        job = session.next_job()
        assert job is not None
        assert job.buffer_start == pytest.approx(speech.time - pad, abs=0.01)


def test_the_config_fields_reach_the_settings_and_unset_keeps_the_defaults() -> None:
    service = LiveService.__new__(LiveService)
    service.limits = LiveLimits()
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=24000)
    default = service.settings_for(stream_request_from_config(config, "m"))
    assert (default.speech_threshold, default.speech_pad) == (0.5, SPEECH_PAD)
    config.speech_threshold, config.speech_pad_seconds = 0.7, 0.3
    request = stream_request_from_config(config, "m")
    settings = service.settings_for(request)
    assert settings.speech_threshold == pytest.approx(0.7) and settings.speech_pad == pytest.approx(0.3)
    for bad in ({"speech_threshold": 1.0}, {"speech_threshold": 0.0}, {"speech_pad": 3.0}, {"speech_pad": -0.1}):
        wrong = StreamRequest(**{**request.__dict__, **bad})
        with pytest.raises(InvalidArgument, match=next(iter(bad)).split("_")[1]):
            service.settings_for(wrong)
