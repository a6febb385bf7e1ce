"""LocalAgreement-2 over word pieces: commit the longest prefix two consecutive hypotheses share.

As in ufal/whisper_streaming (Macháček et al., 2023): a word is committed once two
decodes of the growing buffer in a row put it at the same place; what follows stays a
draft. Pieces carry stream times so a hypothesis can be lined up after what is already
committed even when its start differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference_service.engines.buffer_decoder import normalise, stutters
from inference_service.engines.whisper import Word

MAX_REPEAT_NGRAM = 5
UNHEARD_WORD_SECONDS = 0.04  # an aligned word shorter than this at the end of the audio was not heard
UNHEARD_END_SECONDS = 0.1
MIN_GUESS_PROBABILITY = 0.3
SQUEEZED_WORD_SECONDS = (
    0.05  # aligned words shorter than this on average were not heard: Whisper ran on into the padding
)


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


def common_prefix(first: Sequence[Piece], second: Sequence[Piece]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a.key != b.key:
            break
        count += 1
    return count


def after_committed(hypothesis: Sequence[Piece], committed: Sequence[Piece]) -> list[Piece] | None:
    """The part of ``hypothesis`` that follows the committed words, or None when it does not
    start with them: a decode that heard more audio contradicts what two earlier, shorter
    decodes agreed on (tiny.en read the first 0.8 s of "Ask not" as "S" twice)."""
    if common_prefix(hypothesis, committed) == len(committed):
        return list(hypothesis[len(committed) :])
    return None


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


def drop_looped_tail(pieces: Sequence[Piece]) -> list[Piece]:
    """``pieces`` without a tail that says earlier words of the same hypothesis again.

    Whisper on a short buffer sometimes runs on past the speech into the padding and starts
    the utterance over: "And so my fellow Americans. And so my fellow" from 2.3 s of JFK, the
    repeat's four words aligned to the last 20 ms of the audio. Finalised as such, a result
    repeats its own text (issue 10). Real speech repeats words too ("can do for you, ask what
    you can do for your country"), so a repeat counts as a loop only on evidence: with aligned
    words, when the repeated tail is squeezed (under SQUEEZED_WORD_SECONDS a word); without
    them, when it restarts the hypothesis from its first word right after a sentence end.
    """
    keys = [p.key for p in pieces]
    for index in range(1, len(pieces)):
        size = len(pieces) - index
        tail = keys[index:]
        if size > index or not any(keys[j : j + size] == tail for j in range(index - size + 1)):
            continue
        if pieces[index].word is not None:
            loop = pieces[-1].end - pieces[index].start < SQUEEZED_WORD_SECONDS * size
        else:
            loop = size >= 2 and keys[:size] == tail and ends_sentence(pieces[index - 1])
        if loop:
            return list(pieces[:index])
    return list(pieces)


def drop_unheard_tail(pieces: Sequence[Piece], audio_end: float) -> list[Piece]:
    """``pieces`` without trailing aligned words squeezed against the end of the audio (under
    UNHEARD_WORD_SECONDS long, ending within UNHEARD_END_SECONDS of it): Whisper guessed them
    from the padding ("like your country, like your" from 1.1 s of "what your country", the
    repeat aligned to one instant). For drafts only: at an endpoint the audio runs on past the
    speech, so a real last word is not squeezed there."""
    count = len(pieces)
    while count:
        piece = pieces[count - 1]
        squeezed = piece.end - piece.start < UNHEARD_WORD_SECONDS and piece.end >= audio_end - UNHEARD_END_SECONDS
        if piece.word is None or not squeezed:
            break
        count -= 1
    return list(pieces[:count])


def is_guess(pieces: Sequence[Piece]) -> bool:
    """A hypothesis of a short buffer that is not yet words: it stutters ("S. S.", "and so,
    and so,") or its aligned words have a mean probability under MIN_GUESS_PROBABILITY
    ("answer and answer" for the first 0.65 s of "And so my fellow Americans", mean 0.25)."""
    if stutters([p.key for p in pieces if p.key]):
        return True
    probabilities = [p.word.probability for p in pieces if p.word is not None]
    return bool(probabilities) and sum(probabilities) / len(probabilities) < MIN_GUESS_PROBABILITY


def drop_finalised_head(pieces: Sequence[Piece], final_end: float) -> list[Piece]:
    """``pieces`` without leading aligned words that lie wholly inside audio already
    finalised (they end at or before ``final_end``): a buffer re-decoded with the text
    before it as prompt sometimes says those words again, and they are not new."""
    count = 0
    while count < len(pieces) and pieces[count].word is not None and pieces[count].end <= final_end + 1e-6:
        count += 1
    return list(pieces[count:])


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


def ends_sentence(piece: Piece) -> bool:
    return piece.text.endswith(SENTENCE_END) and not piece.text.endswith("..")
