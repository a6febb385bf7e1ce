"""One Realtime transcription session on a WebSocket: client events in, server events out.

Audio goes to a live stream of the inference service (a LiveCall) opened at the first append
after the session starts, a commit, a clear or an update. With ``server_vad`` one stream
runs as long as the audio flows and the engine's endpoints make the items; with manual
commits (turn_detection null) each commit half-closes the stream, whose results make one item,
and the next append opens another. Everything the session sends goes through one queue, in
the order the events were made. A client that leaves cancels its streams at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.websockets import WebSocket

from voxserve_http.errors import ApiError
from voxserve_http.realtime.calls import LiveCall, streaming_config
from voxserve_http.realtime.items import Conversation, ItemTracker
from voxserve_http.realtime.protocol import (
    Event,
    EventError,
    SessionConfig,
    error_event,
    new_id,
    server_event,
    session_event,
    updated_config,
)
from voxserve_http.state import Gateway

logger = logging.getLogger(__name__)

# OpenAI refuses to commit less than this.
MIN_COMMIT_MS = 100
# Server events waiting for a client that does not read; past this the session ends.
MAX_OUTBOX = 10_000
CLOSE_NORMAL, CLOSE_TRY_AGAIN_LATER, CLOSE_POLICY = 1000, 1013, 1008


class RealtimeSession:
    """Runs one session until the client leaves, goes idle or stops reading."""

    def __init__(
        self, websocket: WebSocket, gw: Gateway, authorization: str | None, config: SessionConfig, dialect: str
    ) -> None:
        self.ws = websocket
        self.gw = gw
        self.authorization = authorization
        self.config = config
        self.id = new_id("sess")
        self.conversation = Conversation(dialect)
        self.call: LiveCall | None = None  # the stream taking audio now
        self.retired: set[LiveCall] = set()  # half-closed or cleared streams still finishing
        self.failure: ApiError | None = None  # the last stream's; no new one until an update or clear
        self.audio_ms = 0.0  # appended since the session began (audio_start_ms / audio_end_ms)
        self.buffer_ms = 0.0  # appended since the last commit or clear
        self.outcome = "client_closed"
        self._outbox: asyncio.Queue[Event | None] = asyncio.Queue()
        self._handlers: Mapping[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "transcription_session.update": self._update,
            "session.update": self._update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._commit,
            "input_audio_buffer.clear": self._clear,
        }

    # ------------------------------------------------------------ the connection

    async def run(self) -> None:
        started = time.monotonic()
        sender = asyncio.create_task(self._send_all(), name="realtime-sender")
        self.emit([session_event("created", self.id, self.config, self.conversation.dialect)])
        try:
            while (text := await self._next_text(sender)) is not None:
                await self._handle(text)
        finally:
            for call in (self.call, *self.retired):
                if call is not None:
                    call.cancel()  # the service ends the stream and frees its leases now
            self._outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sender, timeout=5)
            logger.info(
                "realtime session ended",
                extra={
                    "session_id": self.id,
                    "outcome": self.outcome,
                    "audio_seconds": round(self.audio_ms / 1000, 3),
                    "duration_seconds": round(time.monotonic() - started, 3),
                },
            )

    def emit(self, events: list[Event]) -> None:
        for event in events:
            self._outbox.put_nowait(event)
        if self._outbox.qsize() > MAX_OUTBOX:
            self.outcome = "client_not_reading"
            self._outbox.put_nowait(None)

    async def _send_all(self) -> None:
        with contextlib.suppress(Exception):  # the client left: the receive loop sees it
            while (event := await self._outbox.get()) is not None:
                await self.ws.send_text(json.dumps(event))
        if self.outcome == "client_not_reading":
            await self._close(CLOSE_POLICY, "server events are not being read")

    async def _next_text(self, sender: asyncio.Task[None]) -> str | None:
        """The next text message; None when the session is over (the client left, or it was
        idle too long, or the sender stopped)."""
        idle = self.gw.config.realtime_idle_seconds
        receive = asyncio.ensure_future(self.ws.receive())
        done, _ = await asyncio.wait({receive, sender}, timeout=idle, return_when=asyncio.FIRST_COMPLETED)
        if receive not in done:
            receive.cancel()
            if sender not in done:
                self.outcome = "idle"
                message = f"no client event for {idle:g} s (realtime_idle_seconds): the session is closed"
                self.emit([error_event(message, "idle_timeout")])
                self._outbox.put_nowait(None)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(sender, timeout=5)
                await self._close(CLOSE_NORMAL, "idle")
            return None
        received = receive.result()
        if received["type"] == "websocket.disconnect":
            return None
        text = received.get("text")
        if text is None:
            self.emit([error_event("binary messages are not events: send each event as JSON text", "invalid_event")])
            return ""
        limit = self.gw.config.realtime_max_message_bytes
        if len(text) > limit:
            message_text = (
                f"the event is {len(text)} bytes, over the limit of {limit} (realtime_max_message_bytes); "
                "send audio in smaller appends (20-100 ms each)"
            )
            self.emit([error_event(message_text, "message_too_large")])
            return ""
        return str(text)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)

    async def _handle(self, text: str) -> None:
        if not text:
            return
        try:
            event = json.loads(text)
        except ValueError:
            self.emit([error_event("the message is not JSON; send each event as a JSON object", "invalid_json")])
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.emit([error_event("an event is a JSON object with a string 'type'", "invalid_event", "type")])
            return
        client_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        handler = self._handlers.get(event["type"])
        try:
            if handler is None:
                raise EventError(
                    f"unknown or unsupported event type {event['type'][:64]!r}; a transcription session takes "
                    f"{', '.join(self._handlers)}",
                    code="invalid_event_type",
                    param="type",
                )
            await handler(event)
        except EventError as error:
            self.emit([error_event(error.message, error.code, error.param, client_id)])

    # ------------------------------------------------------------ client events

    async def _update(self, event: dict[str, Any]) -> None:
        config, dialect = updated_config(self.config, event)
        self.conversation.dialect = dialect
        if config != self.config and self.call is not None:
            await self._retire(self.call)  # the next append opens a stream with the new settings
        self.config, self.failure = config, None
        self.emit([session_event("updated", self.id, config, dialect)])

    async def _append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        try:
            data = base64.b64decode(audio if isinstance(audio, str) else "", validate=True)
        except (binascii.Error, ValueError):
            raise EventError("audio must be base64 of pcm16 (little-endian) samples", param="audio") from None
        if not data:
            raise EventError("audio is empty: send base64 of pcm16 samples", param="audio")
        if self.failure is not None:
            return  # its error was sent; the audio is dropped until an update or a clear
        if self.call is None:
            self.call = self._open()
        milliseconds = len(data) / 2 / self.config.rate * 1000
        self.audio_ms += milliseconds
        self.buffer_ms += milliseconds
        await self.call.send(data)

    async def _commit(self, event: dict[str, Any]) -> None:
        if self.call is None or self.buffer_ms < MIN_COMMIT_MS:
            raise EventError(
                f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, got {self.buffer_ms:.0f} ms",
                code="input_audio_buffer_commit_empty",
            )
        call, self.call, self.buffer_ms = self.call, None, 0.0
        if self.config.manual:
            self.emit(call.tracker.commit())
        await self._retire(call)  # half-closed: what is pending becomes final (server_vad: an open utterance)

    async def _clear(self, event: dict[str, Any]) -> None:
        call, self.call, self.buffer_ms, self.failure = self.call, None, 0.0, None
        if call is not None:
            if self.config.manual:
                call.cancel()  # nothing of it was committed
            else:
                call.tracker.drain()  # an utterance already committed still completes
                await self._retire(call)
        self.emit([server_event("input_audio_buffer.cleared")])

    # ------------------------------------------------------------ streams

    def _open(self) -> LiveCall:
        turn = self.config.turn_detection
        tracker = ItemTracker(
            self.conversation,
            manual=self.config.manual,
            offset_ms=self.audio_ms,
            pad=turn.prefix_padding_ms / 1000 if turn is not None else 0.0,
        )
        model = self.config.model
        model_id = "" if not model or model in self.gw.config.default_model_aliases else model
        return LiveCall(
            self.gw.backends,
            streaming_config(self.config, model_id),
            self.authorization,
            tracker,
            self.emit,
            self._failed,
        )

    async def _retire(self, call: LiveCall) -> None:
        if call is self.call:
            self.call = None
        self.retired.add(call)
        call.reader.add_done_callback(lambda _: self.retired.discard(call))
        await call.finish()

    def _failed(self, error: ApiError) -> None:
        self.failure = error
        if self.call is not None and self.call.tracker.done:  # the stream taking audio failed
            self.call = None
