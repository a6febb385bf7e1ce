"""LocalAgreement-2 over word pieces: commit the longest prefix two consecutive hypotheses share.

As in ufal/whisper_streaming (Macháček et al., 2023): a word is committed once two
decodes of the growing buffer in a row put it at the same place; what follows stays a
draft. Pieces carry stream times so a hypothesis can be lined up after what is already
committed even when its start differs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from inference_service.engines.whisper import Word

_PUNCTUATION = re.compile(r"[^\w']+")
ALIGN_SLACK = 0.1  # seconds a piece may start before the last committed end and still count as after it
MAX_REPEAT_NGRAM = 5


@dataclass(frozen=True)
class Piece:
    """One word of a hypothesis: stream-time span, whether its segment ends after it, its aligned word."""

    text: str
    start: float
    end: float
    segment_end: bool  # Whisper closed a segment right after this word
    word: Word | None = None

    @property
    def key(self) -> str:
        return normalise(self.text)


def normalise(text: str) -> str:
    return _PUNCTUATION.sub("", text.lower())


def common_prefix(first: Sequence[Piece], second: Sequence[Piece]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a.key != b.key:
            break
        count += 1
    return count


def after_committed(hypothesis: Sequence[Piece], committed: Sequence[Piece]) -> list[Piece] | None:
    """The part of ``hypothesis`` that follows the committed words, or None if it lines up
    with them only by time (its first words differ from the committed ones)."""
    if common_prefix(hypothesis, committed) == len(committed):
        return list(hypothesis[len(committed) :])
    if not committed:
        return list(hypothesis)
    end = committed[-1].end
    rest = [p for p in hypothesis if p.start >= end - ALIGN_SLACK]
    return drop_repeated_head(rest, committed)


def drop_repeated_head(pieces: Sequence[Piece], before: Sequence[Piece]) -> list[Piece] | None:
    """``pieces`` without a head that repeats the tail of ``before`` (1- to 5-grams): a buffer
    cut at a segment end, decoded with the text before it as prompt, sometimes starts by
    saying the last words again. None when that repetition is all there is."""
    tail = [p.key for p in before[-MAX_REPEAT_NGRAM:]]
    head = [p.key for p in pieces]
    for size in range(min(len(tail), len(head)), 0, -1):
        if tail[-size:] == head[:size]:
            rest = list(pieces[size:])
            return rest if rest else None
    return list(pieces)


def text_of(pieces: Sequence[Piece]) -> str:
    return " ".join(p.text for p in pieces)


SENTENCE_END = (".", "?", "!")


def last_boundary(pieces: Sequence[Piece], limit: int, sentence: bool = True) -> int:
    """The count of leading pieces up to the last segment end among the first ``limit``
    pieces that has words after it (0: none). With ``sentence``, only a segment that ends
    a sentence counts: Whisper also closes segments at commas and trailing-off pauses
    ("First..."), and cutting the buffer there loses the context of the next words."""
    for index in range(min(limit, len(pieces) - 1) - 1, -1, -1):
        piece = pieces[index]
        if piece.segment_end and (
            not sentence or (piece.text.endswith(SENTENCE_END) and not piece.text.endswith(".."))
        ):
            return index + 1
    return 0
