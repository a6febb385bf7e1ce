"""A live stream drops a draft that is still decoding when a final's decode is due, so the final
does not wait for it. The stream's own driver (LiveStream, DecodeWorker, LiveSession) with a
scripted VAD and decoder: which draft hangs is decided by the test, not by the machine's speed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future

import numpy as np

from inference_service.engines.buffer_decoder import DecodedSegment, Hypothesis
from inference_service.engines.speech_detector import CHUNK
from inference_service.live.pcm import Encoding, PcmDecoder
from inference_service.live.service import LiveService
from inference_service.live.session import LiveResult, LiveSession, LiveSettings
from inference_service.live.stream import LiveStream, NoObserver
from inference_service.live.worker import DecodeWorker

RATE = 16000
MESSAGE_SAMPLES = CHUNK * 4  # 128 ms of audio per message, whole VAD steps


class ScriptedVad:
    """Speech until ``speech_until`` stream seconds, silence after."""

    def __init__(self, speech_until: float) -> None:
        self.speech_until = speech_until
        self.time = 0.0

    def probabilities(self, samples: np.ndarray) -> list[float]:
        steps = samples.shape[0] // CHUNK
        out = []
        for _ in range(steps):
            out.append(0.9 if self.time < self.speech_until else 0.0)
            self.time += CHUNK / RATE
        return out


class ScriptedDecoder:
    """The first decode answers at once; the second (a draft during the speech) hangs until the
    test releases it; every later one answers at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.hung = threading.Event()
        self.release = threading.Event()

    def decode(self, audio: np.ndarray, prompt: str, final: bool = False) -> Hypothesis:
        with self.lock:
            self.calls += 1
            call = self.calls
        seconds = audio.shape[0] / RATE
        if call == 2:
            self.hung.set()
            assert self.release.wait(60), "the test never released the hung draft"
            text = "NEVER SHOWN"
        else:
            text = "Ask not." if call > 2 else "Ask"
        segment = DecodedSegment(0.0, seconds, text, (), call > 2)
        return Hypothesis((segment,), seconds, 0.01, False)


async def audio(stream: LiveStream, decoder: ScriptedDecoder, seconds: float) -> AsyncIterator[bytes]:
    """Real-time-free audio: messages as fast as the stream takes them, pausing where the test
    needs a decode to have started."""
    message = np.zeros(MESSAGE_SAMPLES, np.int16).tobytes()
    for index in range(round(seconds * RATE / MESSAGE_SAMPLES)):
        if index == 8:  # 1 s of speech in: wait until the second (hung) draft runs
            while not decoder.hung.is_set():
                await asyncio.sleep(0.01)
        yield message
        await asyncio.sleep(0)


class DropCounter(NoObserver):
    def __init__(self) -> None:
        self.dropped = 0

    def draft_dropped(self) -> None:
        self.dropped += 1


def test_a_draft_still_decoding_is_dropped_when_the_final_is_due() -> None:
    settings = LiveSettings(decode_interval=0.3, speech_end_silence=0.15, endpoint_silence=0.5, first_decode_speech=0.4)
    decoder = ScriptedDecoder()
    worker = DecodeWorker(threads=4)
    stream = LiveStream(
        LiveSession(settings),
        PcmDecoder(Encoding.LINEAR16, RATE),
        ScriptedVad(speech_until=1.5),
        decoder,  # type: ignore[arg-type]
        worker,
        abandon_lag=600.0,
        observer=(observer := DropCounter()),
    )

    async def collect() -> list[LiveResult]:
        events = [event async for event in stream.run(audio(stream, decoder, 3.0))]
        return [event.payload for event in events if isinstance(event.payload, LiveResult)]

    try:
        results = asyncio.run(asyncio.wait_for(collect(), 60))
        # The stream ended; the dropped draft still runs: the service keeps the model leased for it.
        (hung,) = stream.unfinished_decodes()
        assert not hung.done()
    finally:
        decoder.release.set()
        worker.close()
    assert hung.done() and stream.unfinished_decodes() == []
    finals = [r.text for r in results if r.is_final]
    assert finals == ["Ask not."]  # without the drop the stream would wait for the hung draft
    assert all("NEVER" not in r.text for r in results)
    assert stream.stats.drafts_dropped == 1 and observer.dropped == 1 and decoder.calls >= 3


class CountedLease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


class StreamWithDecodes:
    def __init__(self, *futures: Future[Hypothesis]) -> None:
        self.futures = list(futures)

    def unfinished_decodes(self) -> list[Future[Hypothesis]]:
        return [future for future in self.futures if not future.done()]


def test_the_models_are_given_back_after_every_decode_still_running_returns() -> None:
    in_flight, dropped, queued = Future[Hypothesis](), Future[Hypothesis](), Future[Hypothesis]()
    for running in (in_flight, dropped):
        assert running.set_running_or_notify_cancel()
    lease = CountedLease()
    LiveService._release(StreamWithDecodes(in_flight, dropped, queued), [lease], None)  # type: ignore[arg-type]
    assert queued.cancelled() and lease.released == 0  # a decode not started yet never runs
    in_flight.set_result(Hypothesis((), 0.0, 0.0, False))
    assert lease.released == 0  # the dropped draft still runs on the model
    dropped.set_exception(RuntimeError("withdrawn"))
    assert lease.released == 1
