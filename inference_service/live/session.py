"""The decisions of one live stream: when to decode, what to commit, when a result is final.

No threads and no I/O here: the stream driver feeds audio and speech probabilities in,
runs the decodes this asks for, and sends the events it returns. Times are stream
seconds (samples received / 16 kHz), continuous however often the buffer is trimmed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray
from inference_service.engines.buffer_decoder import Hypothesis
from inference_service.engines.speech_detector import CHUNK_SECONDS, VadThresholds
from inference_service.engines.whisper import Word
from inference_service.live.agreement import (
    SENTENCE_END,
    Piece,
    after_committed,
    common_prefix,
    drop_finalised_head,
    drop_looped_tail,
    drop_repeated_head,
    drop_unheard_tail,
    is_guess,
    last_boundary,
    text_of,
)

# Text finalised earlier in the same utterance, given to Whisper as the previous text when
# the buffer was cut inside an utterance. Not across endpoints: with the previous
# sentences as prompt, cut windows looped in 14 of 71 decodes of speech_multi.wav (0 of
# 71 without), and on JFK x6 (issue 10) even the last final alone as prompt made finals
# loop ("Ask not. Ask not. Ask not."). Decoding the previous final's last 1.5 s of audio
# before the new buffer (and dropping its words) was tried too: "Ask not" came out right,
# but "What your country" became "like your country" and new speech after a sentence end
# was often not transcribed at all (WER 9.8 % vs 1.5 % on JFK x6).
PROMPT_CHARS = 200
SPEECH_PAD = 0.2  # audio kept before the VAD's speech start (Silero starts late on soft onsets)
TAIL_PAD = 0.3  # audio decoded after the last speech at an endpoint
# A draft decode of a buffer shorter than this is a guess when it looks like one (is_guess):
# no draft, no agreement. On JFK's audio every first decode of a phrase (0.6-0.7 s of audio)
# was one: "answer and answer", "S. S.", "S, S,".
GUESS_SECONDS = 2.0


@dataclass(frozen=True)
class LiveSettings:
    """How one stream decides; the service fills it from its config and the StreamingConfig."""

    interim_results: bool = True
    endpoint_silence: float = 0.5  # silence that ends an utterance
    max_lag: float = 3.0  # above this lag, decode less often on larger chunks
    decode_interval: float = 0.3  # new audio between two draft decodes
    first_decode_speech: float = 0.4  # speech before the first draft of an utterance
    speech_end_silence: float = 0.15  # silence after which a decode runs to have the final ready
    max_buffer: float = 20.0  # buffer length at which a segment is finalised without agreement
    min_cut_buffer: float = 4.0  # shortest audio finalised inside an utterance (before that, wait for the endpoint)
    initial_prompt: str = ""
    report_words: bool = True  # words in results (always aligned inside: the loop and guess checks need them)
    speech_threshold: float = 0.5  # VAD probability that starts speech; it ends below this minus 0.15
    speech_pad: float = SPEECH_PAD  # audio kept before a speech start


@dataclass(frozen=True)
class SpeechEvent:
    kind: str  # "SPEECH_STARTED" | "END_OF_UTTERANCE"
    time: float


@dataclass(frozen=True)
class LiveResult:
    result_id: str
    is_final: bool
    stability: float
    start: float
    end: float
    text: str
    words: tuple[Word, ...]


@dataclass(frozen=True)
class DecodeJob:
    audio: FloatArray
    buffer_start: float
    audio_end: float
    prompt: str
    final: bool  # every word becomes final (an endpoint or the end of the stream): decoded with the final beam
    # Its result is likely to become final (the decode run when the speech ends, which the
    # endpoint settles from): its model calls go before drafts, like a final's.
    urgent: bool = False


LiveEvent = SpeechEvent | LiveResult


class LiveSession:
    """State of one stream: the audio buffer since the last final result, the speech state,
    the committed and draft words."""

    def __init__(self, settings: LiveSettings, thresholds: VadThresholds | None = None) -> None:
        self.settings = settings
        self.thresholds = thresholds or vad_thresholds(settings.speech_threshold)
        self.received = 0.0  # stream seconds received
        self.processed = 0.0  # decoded, or skipped as silence
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0.0
        self._vad_time = 0.0  # stream time up to which probabilities were applied
        self._in_speech = False
        self._utterance_start: float | None = None  # speech in the buffer not yet final
        self._silence_since: float | None = None
        self._onset: float | None = None  # where the current run of speech began
        # Runs of speech the VAD heard while an endpoint's final was pending (on a loaded
        # machine it runs seconds late): [onset, end or None while it lasts], each one an
        # utterance of its own once the finals before it are done.
        self._queued_runs: list[list[float | None]] = []
        self._endpoint: float | None = None  # speech end of an utterance whose endpoint was seen
        self._last_decode_end = 0.0
        self._heard_until = 0.0  # audio end of the decode the latest hypothesis came from
        self._committed: list[Piece] = []
        self._draft: list[Piece] = []  # the latest hypothesis after the committed words
        self._previous: list[Piece] = []  # the hypothesis before, after the committed words
        self._last_pieces: list[Piece] = []  # the whole latest hypothesis of the open utterance
        self._all_final = False  # every word of the utterance is final and no speech came since
        self._finalized_tail: list[Piece] = []
        self._utterance_text = ""
        self._last_final_end = 0.0
        self._last_draft = ""
        self._ids = itertools.count(1)
        self._result_id = str(next(self._ids))

    # ------------------------------------------------------------ audio in

    @property
    def lag(self) -> float:
        return max(0.0, self.received - self.processed)

    @property
    def has_open_utterance(self) -> bool:
        return self._utterance_start is not None

    def push(self, samples: FloatArray, probabilities: Sequence[float]) -> list[LiveEvent]:
        """Add audio and the VAD's probabilities for the 32 ms steps completed so far."""
        self._buffer = np.concatenate([self._buffer, samples]) if self._buffer.size else samples.copy()
        self.received += samples.shape[0] / WHISPER_SAMPLE_RATE
        events: list[LiveEvent] = []
        for probability in probabilities:
            events.extend(self._vad_step(self._vad_time, probability))
            self._vad_time += CHUNK_SECONDS
        if self._utterance_start is None:
            self._skip_silence()
        return events

    def _vad_step(self, time: float, probability: float) -> list[LiveEvent]:
        if probability >= self.thresholds.speech:
            self._silence_since = None
            self._all_final = False
            if not self._in_speech:
                self._in_speech = True
                self._onset = time
                if self._endpoint is not None:
                    self._queued_runs.append([time, None])
                if self._utterance_start is None and self._endpoint is None:
                    self._utterance_start = time
                    self._trim_to(max(self._buffer_start, time - self.settings.speech_pad))
                    return [SpeechEvent("SPEECH_STARTED", time)]
            return []
        if probability < self.thresholds.silence and self._in_speech:
            if self._silence_since is None:
                self._silence_since = time
            if time + CHUNK_SECONDS - self._silence_since >= self.settings.endpoint_silence:
                self._in_speech = False
                if self._utterance_start is not None and self._endpoint is None:
                    self._endpoint = self._silence_since
                    return [SpeechEvent("END_OF_UTTERANCE", self._silence_since)]
                if self._queued_runs and self._queued_runs[-1][1] is None:
                    self._queued_runs[-1][1] = self._silence_since
        return []

    def _skip_silence(self) -> None:
        """No speech pending: keep only the pad before a possible speech start."""
        self._trim_to(max(self._buffer_start, self.received - self.settings.speech_pad))
        self.processed = max(self.processed, self.received - self.settings.speech_pad)

    def _trim_to(self, time: float) -> None:
        drop = round((time - self._buffer_start) * WHISPER_SAMPLE_RATE)
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start += drop / WHISPER_SAMPLE_RATE

    # ------------------------------------------------------------ decisions

    def next_job(self) -> DecodeJob | None:
        """The decode to run now, if any (the driver runs one at a time per stream, except that a
        final's decode overtakes a draft's: ``urgent_job_due``)."""
        if self._endpoint is not None and self._open():
            return self._job(min(self.received, self._endpoint + self._tail_pad), final=True)
        if self._speech_end_due():
            return self._job(self.received, final=False, urgent=True)
        start = self._utterance_start
        if start is None or self._all_final:
            return None
        received = self.received
        if self._last_decode_end <= start:
            return self._job(received, final=False) if received - start >= self.settings.first_decode_speech else None
        if self._silence_since is not None:
            return None  # a pause began: the decode at speech_end_silence comes next, not a draft before it
        if received - self._last_decode_end >= self._interval():
            return self._job(received, final=False)
        return None

    def urgent_job_due(self) -> bool:
        """A decode whose result becomes final is due (an endpoint, or the speech just ended):
        the driver drops a draft still decoding for it, as if that draft never ran."""
        return (self._endpoint is not None and self._open()) or self._speech_end_due()

    def _open(self) -> bool:
        return self._utterance_start is not None and not self._all_final

    def _speech_end_due(self) -> bool:
        """The speech paused speech_end_silence ago and no decode heard that far: decode now, so
        that the endpoint finds its final ready."""
        return (
            self._utterance_start is not None
            and not self._all_final
            and self._last_decode_end > self._utterance_start
            and self._silence_since is not None
            and self.received - self._silence_since >= self.settings.speech_end_silence
            and self._last_decode_end < self._silence_since + self.settings.speech_end_silence
        )

    def _interval(self) -> float:
        """New audio to wait for before the next draft decode. A stream more than max_lag
        behind waits for 2 x max_lag of new audio: it decodes less often, on larger chunks,
        which frees the shared decode thread instead of queueing behind it; its lag stays
        under about 2 x max_lag plus one decode. Finals at endpoints are not held back."""
        if self.lag > self.settings.max_lag:
            return 2 * self.settings.max_lag
        return self.settings.decode_interval

    def finish_job(self) -> DecodeJob | None:
        """At the end of the stream: the decode that makes everything pending final."""
        if self._utterance_start is None or self._all_final or self._buffer.size == 0:
            return None
        return self._job(self.received, final=True)

    def _job(self, end: float, final: bool, urgent: bool = False) -> DecodeJob:
        samples = round((end - self._buffer_start) * WHISPER_SAMPLE_RATE)
        prompt = " ".join(p for p in (self.settings.initial_prompt, self._utterance_text[-PROMPT_CHARS:]) if p)
        return DecodeJob(self._buffer[:samples].copy(), self._buffer_start, end, prompt, final, urgent=final or urgent)

    # ------------------------------------------------------------ results

    def apply(self, job: DecodeJob, hypothesis: Hypothesis) -> list[LiveEvent]:
        """Fold a finished decode in: commit what two decodes agree on, finalise complete
        segments (or everything, for a final job), return the results to send."""
        self._last_decode_end = max(self._last_decode_end, job.audio_end)
        self.processed = max(self.processed, job.audio_end)
        pieces = to_pieces(hypothesis, job.buffer_start, job.audio_end, self._last_final_end)
        # Never final twice (issue 10): not the words of audio already final, not a loop.
        pieces = drop_looped_tail(drop_finalised_head(pieces, self._last_final_end))
        if not self._committed:
            pieces = drop_repeated_head(pieces, self._finalized_tail) or []
        if not job.final:
            pieces = drop_unheard_tail(pieces, job.audio_end)
            if job.audio_end - max(job.buffer_start, self._last_final_end) < GUESS_SECONDS and is_guess(pieces):
                return []  # not words yet: neither a draft nor a vote for the agreement
        self._last_pieces = pieces
        self._heard_until = job.audio_end
        if job.final:
            # The decode of the whole utterance heard to its end beats words two drafts agreed
            # on early (a 0.5 s buffer of "Second" read twice as "I can't"): drafts may change.
            words = pieces or self._committed + self._draft
            return self._final_all(words, job.audio_end, resume=self._endpoint is not None)
        rest = after_committed(pieces, self._committed)
        if rest is None:
            # The committed words were agreed on too early (they are not final yet, so they
            # may still change): agree again, from this hypothesis against the one before.
            self._previous = self._committed + self._draft
            self._committed = []
            rest = pieces
        agreed = common_prefix(self._previous, rest)
        self._committed += rest[:agreed]
        self._draft = rest[agreed:]
        self._previous = self._draft
        return self._final_segments(job) + self._interim()

    def _final_segments(self, job: DecodeJob) -> list[LiveEvent]:
        """Committed words up to a segment end that has words after it are final: emit them
        and cut the buffer there. A buffer past max_buffer is cut at its first segment end
        even without agreement, so memory and decode time stay bounded."""
        words = self._committed + self._draft
        speech_end: float | None = None
        # The boundary must lie inside the committed words (a committed word follows it).
        count = last_boundary(words, len(self._committed) - 1)
        if count and words[count - 1].end - self._buffer_start < self.settings.min_cut_buffer:
            count = 0
        if count == 0 and self._paused_after(job) and words and not self._draft and _ends_sentence(words[-1]):
            count = len(words)  # a pause after a sentence both decodes agree on: final before the endpoint
            self._all_final = True
            speech_end = self._silence_since
        if count == 0 and job.audio_end - self._buffer_start > self.settings.max_buffer:
            count = last_boundary(words, len(words), sentence=False) or len(words)
        if count == 0:
            return []
        final, remaining = words[:count], words[count:]
        self._committed = self._committed[count:]
        self._draft = remaining[len(self._committed) :]
        self._previous = self._draft
        self._last_pieces = remaining
        event = self._emit_final(final, speech_end)
        self._trim_to(min(job.audio_end, final[-1].end))
        return [event]

    def settle(self) -> list[LiveEvent]:
        """At an endpoint already covered by the last decode (the one run when the silence
        began), finalise from it without decoding again."""
        if self._endpoint is None:
            return []
        if self._all_final:
            return self._final_all([], min(self.received, self._endpoint + self._tail_pad), resume=True)
        if self._heard_until < self._endpoint + self.settings.speech_end_silence:
            return []
        end = min(self.received, self._endpoint + self._tail_pad)
        return self._final_all(self._last_pieces or self._committed + self._draft, end, resume=True)

    @property
    def _tail_pad(self) -> float:
        return min(TAIL_PAD, self.settings.endpoint_silence)

    def _paused_after(self, job: DecodeJob) -> bool:
        """The VAD hears silence since before the end of this job's audio, long enough that the
        decode heard the last word out."""
        since = self._silence_since
        return since is not None and job.audio_end >= since + self.settings.speech_end_silence

    def _final_all(self, words: list[Piece], end: float, resume: bool) -> list[LiveEvent]:
        """Everything pending is final; with ``resume``, speech heard since the endpoint
        opens the next utterance (at the end of the stream there is none)."""
        events: list[LiveEvent] = []
        if words:
            events.append(self._emit_final(words, self._endpoint))
        self._utterance_text = ""
        self._committed, self._draft, self._previous, self._last_pieces = [], [], [], []
        self._all_final = False
        self._trim_to(end)
        self._endpoint = None
        self._last_draft = ""
        self._utterance_start = None
        if resume and self._queued_runs:
            # Speech resumed while this endpoint's final was pending: the next utterance is
            # the first run heard since, with its own endpoint if it ended too, so no
            # sentence spoken in between is lost or merged into the next.
            onset, run_end = self._queued_runs.pop(0)
            assert onset is not None
            self._utterance_start = max(end, onset)
            self._trim_to(max(self._buffer_start, self._utterance_start - self.settings.speech_pad))
            events.append(SpeechEvent("SPEECH_STARTED", self._utterance_start))
            if run_end is not None:
                self._endpoint = run_end
                events.append(SpeechEvent("END_OF_UTTERANCE", run_end))
        else:
            self._queued_runs.clear()
            self._skip_silence()
        return events

    def _emit_final(self, words: list[Piece], speech_end: float | None = None) -> LiveResult:
        """A final result; its end is where the VAD heard the speech stop when that is known
        (Whisper's end timestamps on cut windows come up to 0.4 s early)."""
        start = max(self._last_final_end, words[0].start)
        end = max(start, words[-1].end, speech_end or 0.0)
        aligned = self._aligned(words)
        result = LiveResult(self._result_id, True, 1.0, start, end, text_of(words), aligned)
        self._last_final_end = end
        self._utterance_text = (self._utterance_text + " " + result.text).strip()[-PROMPT_CHARS:]
        self._finalized_tail = (self._finalized_tail + words)[-8:]
        self._result_id = str(next(self._ids))
        self._last_draft = ""
        return result

    def _aligned(self, words: list[Piece]) -> tuple[Word, ...]:
        return tuple(p.word for p in words if p.word is not None) if self.settings.report_words else ()

    def _interim(self) -> list[LiveEvent]:
        words = self._committed + self._draft
        text = text_of(words)
        if not self.settings.interim_results or not words or text == self._last_draft:
            return []
        self._last_draft = text
        start = max(self._last_final_end, words[0].start)
        stability = len(self._committed) / len(words)
        aligned = self._aligned(words)
        return [LiveResult(self._result_id, False, stability, start, max(start, words[-1].end), text, aligned)]


def vad_thresholds(speech: float) -> VadThresholds:
    """Thresholds for a speech threshold, with Silero's own hysteresis (silence 0.15 below it)."""
    return VadThresholds(speech=speech, silence=max(0.01, speech - 0.15))


def _ends_sentence(piece: Piece) -> bool:
    return piece.text.endswith(SENTENCE_END) and not piece.text.endswith("..")


def to_pieces(hypothesis: Hypothesis, offset: float, audio_end: float, not_before: float) -> list[Piece]:
    """Words of a hypothesis in stream time, clamped into ``[not_before, audio_end]``; without
    aligned words, a segment's span is shared among its words by their length."""
    pieces: list[Piece] = []

    def clamp(value: float) -> float:
        return min(audio_end, max(not_before, offset + value))

    for segment in hypothesis.segments:
        if segment.words:
            for index, word in enumerate(segment.words):
                start, end = clamp(word.start), clamp(word.end)
                shifted = Word(start, max(start, end), word.word, word.probability)
                last = index == len(segment.words) - 1
                pieces.append(Piece(word.word.strip(), start, shifted.end, last and segment.closed, shifted))
            continue
        texts = segment.text.split()
        total = sum(len(t) for t in texts) or 1
        position = segment.start
        span = max(0.0, segment.end - segment.start)
        for index, text in enumerate(texts):
            step = span * len(text) / total
            last = index == len(texts) - 1
            pieces.append(Piece(text, clamp(position), clamp(position + step), last and segment.closed))
            position += step
    return [p for p in pieces if p.text]
