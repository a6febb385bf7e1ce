"""One decode of a short buffer (live audio, a file's first utterance) with CTranslate2, encoder cut to it.

faster-whisper's ``transcribe()`` pads every window to 30 s before the encoder; on this
machine (2 cores, tiny.en int8) that encoder pass alone takes 0.24-0.32 s whatever the
audio length, and a 3 s live buffer costs as much as 30 s of audio. CTranslate2 accepts
shorter mel inputs: the encoder then costs 47 ms for 10 s and 18 ms for 5 s. Whisper was
trained on 30 s windows, so a cut window occasionally loops ("the fourth Friday, the
fourth Friday...") when the audio ends abruptly; the buffer is therefore padded with 2 s
of silence (then up to a whole 5 s bucket, so that buffers of different streams batch), the
output length is bounded by the padded length, and a looping or unlikely result is decoded
again the standard way (30 s window). Measured on tests/data
speech_multi.wav cut at every second from 2 to 25 s: the same transcript as the 30 s path
(WER 0.022 both, vs the reference), in half the time even at those lengths.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import get_suppressed_tokens, merge_punctuations

from inference_service.audio import WHISPER_SAMPLE_RATE, FloatArray
from inference_service.engines.whisper import Word

logger = logging.getLogger(__name__)

PAD_SECONDS = 2.0  # silence after the audio so the model hears where it ends
FULL_FRAMES = 3000  # 30 s of mel frames: Whisper's trained window
MAX_SECONDS = 30.0
STAMP_SLACK = 0.1  # a segment starting this close to the end of the audio, or after, is invented
# A cut window (audio + pad) is padded up to a whole number of buckets (DecodeSettings.window_bucket,
# the service's live_window_bucket_seconds), and its output bound follows the padded length: the
# encoder and decoder calls of every buffer in one bucket have the same shape and options, so
# buffers of different streams share a batch (the decode scheduler), and a stream's words depend
# on its own audio only, never on who else streams. Measured on tiny.en, streams replayed offline
# (LiveSession, Silero VAD, every decode at once), WER without a bucket / 1 / 2 / 3 / 5 / 10 s:
# JFK x6 0.0 / 1.5 / 5.3 / 5.3 / 1.5 / 0.0 %, speech_multi.wav x2 1.1 % for all, 15 espeak-ng
# sentences 10.3 / 11.6 / 11.6 / 10.3 / 10.3 / 11.0 % (what padding adds: a trailing "you." or a
# phrase said twice). Compute of those streams with 5 s: 1.13x; 2 / 4 / 8 buffers of one bucket
# decoded in one batch: 1.04x / 1.29x / 1.38x faster than one by one (docs/performance.md).
WINDOW_BUCKET_SECONDS = 5.0
TOKENS_PER_SECOND = 6  # bound on the output: fast speech is ~4 tokens/s
COMPRESSION_LIMIT = 2.4  # faster-whisper's compression_ratio_threshold: above it, text loops
LOGPROB_LIMIT = -1.0  # faster-whisper's log_prob_threshold
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # faster-whisper's defaults
_WORD = re.compile(r"[\w']+")
_PUNCTUATION = re.compile(r"[^\w']+")
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass(frozen=True)
class DecodedSegment:
    """A span of the buffer (seconds from the buffer start); ``closed`` once Whisper gave its end timestamp."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...]
    closed: bool
    token_count: int = 0


@dataclass(frozen=True)
class Hypothesis:
    segments: tuple[DecodedSegment, ...]
    audio_seconds: float  # how much audio was decoded
    compute_seconds: float
    full_window: bool  # decoded again with the 30 s window
    avg_logprob: float = 0.0  # mean log probability per output token (faster-whisper's measure of confidence)


@dataclass(frozen=True)
class DecodeSettings:
    language: str | None
    task: str
    beam_size: int
    word_timestamps: bool
    hotwords: str | None
    temperature: float | None = None  # above 0: sample at it (one hypothesis); else beam search
    # The beam of a decode that makes an utterance final (0: beam_size). Greedy drafts are
    # fast; the endpoint decode decides the words for good: on JFK x6 greedy read "Ask not"
    # alone as "S NOT" in 2 of 6 repetitions, beam 5 in none (docs/performance.md).
    final_beam_size: int = 0
    # Cut windows are padded to a whole number of these (0: not padded; see WINDOW_BUCKET_SECONDS).
    window_bucket: float = WINDOW_BUCKET_SECONDS


def window_frames(frames: int, bucket_seconds: float) -> int:
    """The encoder length of a cut window of ``frames`` mel frames: the next whole bucket (at most 30 s)."""
    bucket = max(1, round(bucket_seconds * 100))
    return min(FULL_FRAMES, -(-frames // bucket) * bucket)


class BufferDecoder:
    """Decodes the buffers of one stream (the tokenizer is fixed once the language is known)."""

    def __init__(self, model: WhisperModel, settings: DecodeSettings) -> None:
        self.model = model
        self.settings = settings
        self._tokenizer: Tokenizer | None = None
        self._suppress: list[int] = []

    def decode(self, audio: FloatArray, prompt: str, final: bool = False) -> Hypothesis:
        """Segments of ``audio`` (16 kHz mono, at most 30 s), conditioned on ``prompt`` (the text
        before it). ``final`` decodes with the final beam; a beam result that says a word or a
        pair of words twice in a row is checked against the draft beam, which wins if it does
        not (beam 5 looped on 2 of 88 utterance prefixes of speech_multi.wav: "third, third,
        third,", greedy on none)."""
        started = time.perf_counter()
        audio = audio[-int(MAX_SECONDS * WHISPER_SAMPLE_RATE) :]
        seconds = audio.shape[0] / WHISPER_SAMPLE_RATE
        padded = np.concatenate([audio, np.zeros(int(PAD_SECONDS * WHISPER_SAMPLE_RATE), np.float32)])
        features = self.model.feature_extractor(padded, padding=0)[:, :-1]
        content_frames = min(FULL_FRAMES, round(seconds * 100))
        beam = (self.settings.final_beam_size or self.settings.beam_size) if final else self.settings.beam_size
        segments, logprob, full = self._decode_window(features, content_frames, prompt, seconds, beam)
        if beam != self.settings.beam_size and _stutters(segments):
            draft = self._decode_window(features, content_frames, prompt, seconds, self.settings.beam_size)
            if not _stutters(draft[0]):
                segments, logprob, full = draft
        return Hypothesis(tuple(segments), seconds, time.perf_counter() - started, full, logprob)

    def _decode_window(
        self, features: np.ndarray, content_frames: int, prompt: str, seconds: float, beam: int
    ) -> tuple[list[DecodedSegment], float, bool]:
        """The cut window's decode, or the 30 s window's when the cut one looks wrong; whether it was."""
        segments, logprob, suspicious = self._decode_features(features, content_frames, prompt, seconds, beam, False)
        if not suspicious:
            return segments, logprob, False
        segments, logprob, _ = self._decode_features(features, content_frames, prompt, seconds, beam, True)
        return segments, logprob, True

    def _decode_features(
        self, features: np.ndarray, content_frames: int, prompt: str, seconds: float, beam: int, full: bool
    ) -> tuple[list[DecodedSegment], float, bool]:
        frames = FULL_FRAMES if full else window_frames(features.shape[1], self.settings.window_bucket)
        # The output bound of a bucket's decodes is one (the calls' options must be equal to
        # share a batch); the 30 s fallback keeps the audio's own.
        bound = seconds if full else max(seconds, frames / 100 - PAD_SECONDS)
        window = np.full((features.shape[0], frames), float(features.min()), np.float32)
        used = min(frames, features.shape[1])
        window[:, :used] = features[:, :used]
        encoder_output = self.model.model.encode(ctranslate2.StorageView.from_array(window[None]), to_cpu=False)
        tokenizer = self._tokenizer_for(encoder_output)
        sequence = self._prompt(tokenizer, prompt)
        sampling = self.settings.temperature is not None and self.settings.temperature > 0
        result = self.model.model.generate(
            encoder_output,
            [sequence],
            beam_size=1 if sampling else beam,
            sampling_topk=0 if sampling else 1,  # 0: sample from the whole distribution
            sampling_temperature=self.settings.temperature if sampling else 1.0,
            max_length=min(448, len(sequence) + int(bound * TOKENS_PER_SECOND) + 8),
            suppress_blank=True,
            suppress_tokens=self._suppress,
            return_scores=True,
            max_initial_timestamp_index=50,
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t != tokenizer.eot]
        text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
        logprob = result.scores[0] / (len(tokens) + 1)
        suspicious = bool(text.strip()) and (_compression_ratio(text) > COMPRESSION_LIMIT or logprob < LOGPROB_LIMIT)
        segments = self._segments(tokenizer, tokens, seconds)
        if self.settings.word_timestamps and segments:
            segments = self._with_words(tokenizer, tokens, segments, encoder_output, content_frames, seconds)
        return segments, logprob, suspicious

    def _tokenizer_for(self, encoder_output: ctranslate2.StorageView) -> Tokenizer:
        if self._tokenizer is None:
            language = self.settings.language or "en"
            if self.model.model.is_multilingual and self.settings.language is None:
                language = self.model.model.detect_language(encoder_output)[0][0][0][2:-2]
            self._tokenizer = Tokenizer(
                self.model.hf_tokenizer, self.model.model.is_multilingual, task=self.settings.task, language=language
            )
            self._suppress = list(get_suppressed_tokens(self._tokenizer, (-1,)) or ())
        return self._tokenizer

    def _prompt(self, tokenizer: Tokenizer, prompt: str) -> list[int]:
        previous = " ".join(p for p in (self.settings.hotwords, prompt) if p).strip()
        sequence: list[int] = []
        if previous:
            sequence.append(tokenizer.sot_prev)
            sequence.extend(tokenizer.encode(" " + previous)[-(self.model.max_length // 2 - 1) :])
        sequence.extend(tokenizer.sot_sequence)
        return sequence

    @staticmethod
    def _segments(tokenizer: Tokenizer, tokens: list[int], seconds: float) -> list[DecodedSegment]:
        """Split at timestamp tokens: ``<|t0|> text <|t1|>`` is one closed segment; text after
        the last timestamp is an open segment that runs to the end of the audio."""
        segments: list[DecodedSegment] = []
        start: float | None = None
        text_tokens: list[int] = []
        for token in tokens:
            if token >= tokenizer.timestamp_begin:
                stamp = (token - tokenizer.timestamp_begin) * 0.02
                if text_tokens:
                    if (start or 0.0) >= seconds - STAMP_SLACK:  # placed in the padding: invented
                        return _without_loops(segments)
                    segments.append(_segment(tokenizer, text_tokens, start or 0.0, min(seconds, stamp), closed=True))
                    text_tokens, start = [], None
                else:
                    start = stamp
            elif token < tokenizer.eot:
                text_tokens.append(token)
        if text_tokens:
            begin = start if start is not None else (segments[-1].end if segments else 0.0)
            segments.append(_segment(tokenizer, text_tokens, begin, seconds, closed=False))
        return _without_loops([s for s in segments if s.text])

    def _with_words(
        self,
        tokenizer: Tokenizer,
        tokens: list[int],
        segments: list[DecodedSegment],
        encoder_output: ctranslate2.StorageView,
        content_frames: int,
        seconds: float,
    ) -> list[DecodedSegment]:
        text_tokens = [t for t in tokens if t < tokenizer.eot]
        alignment = self.model.find_alignment(tokenizer, [text_tokens], encoder_output, max(1, content_frames))[0]
        merge_punctuations(alignment, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS)
        out: list[DecodedSegment] = []
        consumed = 0  # text tokens of the segments so far; a word belongs where its first token is
        position = 0
        words = iter(alignment)
        pending = next(words, None)
        for segment in segments:
            consumed += segment.token_count
            own: list[Word] = []
            while pending is not None and position < consumed:
                position += len(pending["tokens"])
                if pending["word"]:
                    start = min(seconds, float(pending["start"]))
                    own.append(
                        Word(
                            start,
                            max(start, min(seconds, float(pending["end"]))),
                            pending["word"],
                            float(pending["probability"]),
                        )
                    )
                pending = next(words, None)
            out.append(
                DecodedSegment(
                    segment.start, segment.end, segment.text, tuple(own), segment.closed, segment.token_count
                )
            )
        return out


def _segment(tokenizer: Tokenizer, text_tokens: list[int], start: float, end: float, closed: bool) -> DecodedSegment:
    return DecodedSegment(start, max(start, end), tokenizer.decode(text_tokens).strip(), (), closed, len(text_tokens))


def _without_loops(segments: list[DecodedSegment]) -> list[DecodedSegment]:
    """The segments before the first one that says an earlier one again (the loop a cut
    window sometimes falls into: "See you next, week. See you next week. See"), compared
    without case and punctuation; an open last segment that starts an earlier one again
    counts too."""
    seen: list[str] = []
    kept: list[DecodedSegment] = []
    for segment in segments:
        key = " ".join(_WORD.findall(segment.text.lower()))
        if key in seen or (not segment.closed and any(earlier.startswith(key) for earlier in seen)):
            break
        seen.append(key)
        kept.append(segment)
    return kept


def normalise(text: str) -> str:
    """A word as the loop and agreement checks compare it: lower case, no punctuation."""
    return _PUNCTUATION.sub("", text.lower())


def stutters(keys: Sequence[str]) -> bool:
    """A word or a pair of words said twice in a row (``keys`` normalised, none empty)."""
    return any(a == b for a, b in itertools.pairwise(keys)) or any(
        keys[i : i + 2] == keys[i + 2 : i + 4] for i in range(len(keys) - 3)
    )


def _stutters(segments: list[DecodedSegment]) -> bool:
    keys = [normalise(word) for segment in segments for word in segment.text.split()]
    return stutters([key for key in keys if key])


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))
