"""Realtime items from a live stream's responses: no I/O, one tracker per StreamingTranscribe call.

An item is what OpenAI transcribes as one piece: with ``server_vad`` an utterance of the live
engine (SPEECH_STARTED .. END_OF_UTTERANCE), with manual commits the audio of one commit
(one call). Its text is the engine's final results joined; while it is spoken, the words of
its drafts that two decodes agreed on go out as deltas. Deltas only ever append: a delta is
sent when the item's text so far still starts with everything already sent (a final decode
that rewrote an agreed word sends no delta for the rest; ``completed`` carries the final text).
``completed`` is sent once, when the final result covering the utterance's end is in (or the
next utterance began, or the stream ended), and its transcript never changes afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve_http.realtime.protocol import BETA, Event, new_id, server_event

CONTENT_INDEX = 0
# Final results end where the VAD heard the speech stop; this much slack when comparing them
# with the END_OF_UTTERANCE time (floats went through protobuf doubles).
END_SLACK_SECONDS = 1e-3
TRAILING_PUNCTUATION = ".,;:!?…-\"'"


@dataclass
class Conversation:
    """What a session's calls share: the order of committed items (previous_item_id)."""

    dialect: str = BETA
    last_item_id: str | None = None

    def committed(self, item_id: str) -> list[Event]:
        previous, self.last_item_id = self.last_item_id, item_id
        created = "conversation.item.created" if self.dialect == BETA else "conversation.item.added"
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        return [
            server_event("input_audio_buffer.committed", item_id=item_id, previous_item_id=previous),
            server_event(created, previous_item_id=previous, item=item),
        ]


@dataclass
class Item:
    id: str
    finals: list[str] = field(default_factory=list)
    draft: str = ""  # the agreed words of the latest draft
    sent: str = ""  # the deltas so far, added up
    committed: bool = False
    speech_end: float | None = None  # stream seconds, from END_OF_UTTERANCE
    covered: float = -1.0  # end of its latest final result

    def text(self) -> str:
        return " ".join(t for t in (*self.finals, self.draft) if t)

    @property
    def transcript(self) -> str:
        return " ".join(t for t in self.finals if t)


def agreed_words(result: ipb.StreamingResult) -> str:
    """The words of a draft two decodes agreed on (its ``stability`` share), less the last
    one and the punctuation after them: the final decode (beam search over the whole
    utterance) most often changes the last agreed word or its punctuation ("First..." that
    became "First,"), and a delta cannot be taken back."""
    words = result.text.split()
    agreed = int(result.stability * len(words) + 1e-6)
    return " ".join(words[: max(0, agreed - 1)]).rstrip(TRAILING_PUNCTUATION)


class ItemTracker:
    """Turns one call's responses into Realtime server events.

    ``offset_ms``: session audio before this call began (audio_start_ms / audio_end_ms count
    from the session's first appended sample); ``pad``: the speech pad (prefix_padding_ms)
    in seconds, which speech_started's audio_start_ms includes, as OpenAI's does.
    """

    def __init__(self, conversation: Conversation, manual: bool, offset_ms: float = 0.0, pad: float = 0.0) -> None:
        self.conversation = conversation
        self.manual = manual
        self.offset_ms = offset_ms
        self.pad = pad
        self.current: Item | None = None
        self.draining = False  # after a clear: only an item already committed may still finish
        self.received = 0.0
        self.done = False

    # ------------------------------------------------------------ the call's responses

    def on_response(self, response: ipb.StreamingTranscribeResponse) -> list[Event]:
        self.received = max(self.received, response.audio_received_seconds)
        kind = response.WhichOneof("event")
        if kind == "speech_event":
            return self._speech(response.speech_event)
        if kind == "result":
            return self._result(response.result)
        if kind == "completed":
            return self.finish()
        return []

    def _speech(self, event: ipb.SpeechEvent) -> list[Event]:
        if self.manual:
            return []
        if event.type == ipb.SPEECH_STARTED:
            out = self._complete() if self.current is not None else []
            if self.draining:
                return out
            self.current = Item(new_id("item"))
            start_ms = self._ms(max(0.0, event.time - self.pad))
            return [
                *out,
                server_event("input_audio_buffer.speech_started", audio_start_ms=start_ms, item_id=self.current.id),
            ]
        if event.type == ipb.END_OF_UTTERANCE and self.current is not None and not self.current.committed:
            if self.draining:
                self.current = None
                return []
            item = self.current
            item.speech_end = event.time
            stopped = server_event(
                "input_audio_buffer.speech_stopped", audio_end_ms=self._ms(event.time), item_id=item.id
            )
            return [stopped, *self.commit(), *self._complete_if_covered()]
        return []

    def _result(self, result: ipb.StreamingResult) -> list[Event]:
        if self.draining and (self.current is None or not self.current.committed):
            return []
        out: list[Event] = []
        orphan = self.current is None  # a result after its utterance completed: an item of its own
        if orphan:
            self.current = Item(new_id("item"))
            if not self.manual:
                out += self.commit()
        item = self.current
        assert item is not None
        if result.is_final:
            item.finals.append(result.text.strip())
            item.draft = ""
            item.covered = max(item.covered, result.end)
            if orphan and not self.manual:
                item.speech_end = item.covered
        else:
            item.draft = agreed_words(result)
        out += self._delta(item)
        return out + self._complete_if_covered()

    # ------------------------------------------------------------ the session's decisions

    def commit(self) -> list[Event]:
        """Commit the current item (at END_OF_UTTERANCE; with manual commits, at the client's
        commit): committed and item.created, then the deltas held back until now."""
        if self.current is None:
            self.current = Item(new_id("item"))
        item = self.current
        if item.committed:
            return []
        item.committed = True
        return [*self.conversation.committed(item.id), *self._delta(item)]

    def drain(self) -> None:
        """After a clear: what was not committed is dropped; a committed item still finishes."""
        self.draining = True
        if self.current is not None and not self.current.committed:
            self.current = None

    def finish(self) -> list[Event]:
        """The call ended (completed): every result was final. An utterance still open is
        stopped and committed here, so each item the client saw begin completes."""
        if self.done:
            return []
        out: list[Event] = []
        item = self.current
        if item is not None and not item.committed and not self.draining:
            if not self.manual:
                stopped_ms = self._ms(self.received)
                out.append(server_event("input_audio_buffer.speech_stopped", audio_end_ms=stopped_ms, item_id=item.id))
            out += self.commit()
        self.done = True
        return out + self._complete()

    def fail(self, error: Event) -> list[Event]:
        """The call failed: the item the client was told about fails with ``error``."""
        item, self.current, self.done = self.current, None, True
        if item is None or (not item.committed and self.manual):
            return []
        return [
            server_event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item.id,
                content_index=CONTENT_INDEX,
                error=error,
            )
        ]

    # ------------------------------------------------------------ helpers

    def _ms(self, seconds: float) -> int:
        return round(self.offset_ms + seconds * 1000)

    def _delta(self, item: Item) -> list[Event]:
        if self.manual and not item.committed:
            return []  # OpenAI's order: a buffer's transcription follows its commit
        text = item.text()
        if len(text) <= len(item.sent) or not text.startswith(item.sent):
            return []
        delta, item.sent = text[len(item.sent) :], text
        return [
            server_event(
                "conversation.item.input_audio_transcription.delta",
                item_id=item.id,
                content_index=CONTENT_INDEX,
                delta=delta,
            )
        ]

    def _complete_if_covered(self) -> list[Event]:
        item = self.current
        if item is None or not item.committed or item.speech_end is None:
            return []
        return self._complete() if item.covered >= item.speech_end - END_SLACK_SECONDS else []

    def _complete(self) -> list[Event]:
        item, self.current = self.current, None
        if item is None or not item.committed:
            return []
        return [
            server_event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item.id,
                content_index=CONTENT_INDEX,
                transcript=item.transcript,
            )
        ]
