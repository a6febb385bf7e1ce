"""One live stream of a realtime session: a StreamingTranscribe call fed from a queue, whose
responses its ItemTracker turns into server events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_http.clients import INFERENCE, Backends
from voxserve_http.errors import ApiError
from voxserve_http.realtime.items import ItemTracker
from voxserve_http.realtime.protocol import Event, SessionConfig, api_error_event, error_body

MODEL_NOT_FOUND = ("model_not_found", "session.input_audio_transcription.model")
# Audio chunks waiting for the gRPC stream (a cold model loads while the client keeps
# sending); past this the session stops reading the WebSocket: back-pressure to the client.
AUDIO_QUEUE_CHUNKS = 1000

Emit = Callable[[list[Event]], None]


def streaming_config(config: SessionConfig, model_id: str) -> ipb.StreamingConfig:
    """The StreamingConfig of a session's settings: pcm16 at its rate, drafts on, and
    server_vad's settings as the engine's endpointing."""
    options = ipb.TranscribeOptions(model_id=model_id, language=config.language, initial_prompt=config.prompt)
    message = ipb.StreamingConfig(
        options=options, encoding=ipb.LINEAR16, sample_rate_hertz=config.rate, channels=1, interim_results=True
    )
    turn = config.turn_detection
    if turn is not None:
        message.endpoint_silence_seconds = turn.silence_duration_ms / 1000
        message.speech_threshold = turn.threshold
        message.speech_pad_seconds = turn.prefix_padding_ms / 1000
    return message


class LiveCall:
    """A StreamingTranscribe call: ``send`` queues audio, ``finish`` half-closes (every result
    becomes final, then ``completed``), ``cancel`` ends it at once (the service stops the
    stream and frees its leases). A failure is an ``error`` event and ``on_failure(error)``."""

    def __init__(
        self,
        backends: Backends,
        config: ipb.StreamingConfig,
        authorization: str | None,
        tracker: ItemTracker,
        emit: Emit,
        on_failure: Callable[[ApiError], None],
    ) -> None:
        self.tracker = tracker
        self.audio_bytes = 0
        self._emit = emit
        self._on_failure = on_failure
        self._audio: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=AUDIO_QUEUE_CHUNKS)
        self._cancelled = False
        self._finished = False
        self.call = backends.streaming_transcribe(self._requests(config), authorization)
        self.reader = asyncio.create_task(self._read(backends), name="realtime-live-call")

    @property
    def done(self) -> bool:
        return self.reader.done()

    async def send(self, audio: bytes) -> None:
        self.audio_bytes += len(audio)
        await self._put(audio)

    async def finish(self) -> None:
        if not self._finished:
            self._finished = True
            await self._put(None)

    def cancel(self) -> None:
        self._cancelled = True
        self.call.cancel()
        self.reader.cancel()

    async def _put(self, item: bytes | None) -> None:
        """Queue ``item`` unless the call has ended (a failed call reads no more)."""
        if self.reader.done():
            return
        put = asyncio.ensure_future(self._audio.put(item))
        done, _ = await asyncio.wait({put, self.reader}, return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await put

    async def _requests(self, config: ipb.StreamingConfig) -> AsyncIterator[ipb.StreamingTranscribeRequest]:
        yield ipb.StreamingTranscribeRequest(config=config)
        while (chunk := await self._audio.get()) is not None:
            yield ipb.StreamingTranscribeRequest(audio=chunk)

    async def _read(self, backends: Backends) -> None:
        try:
            async for response in backends.stream(INFERENCE, self.call, not_found=MODEL_NOT_FOUND):
                self._emit(self.tracker.on_response(response))
            self._emit(self.tracker.finish())
        except ApiError as error:
            if self._cancelled:
                return
            body = error_body(error.message, error.code, error.param, error.type)
            self._emit([*self.tracker.fail(body), api_error_event(error)])
            self._on_failure(error)
