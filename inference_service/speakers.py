"""Speaker labels on a transcript: what a diarize request asks for, and segments and words labelled from the turns.

Diarization (engines/diarization.py) gives speaker turns; here each word takes the speaker of
the turn it overlaps most (the nearest turn when it overlaps none), a segment is split where
its words change speaker, and speakers get their labels: SPEAKER_00, SPEAKER_01, ... in order
of first appearance, or the name of a known speaker whose reference clip matches the voice.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import linear_sum_assignment

from inference_service.engines.diarization import KNOWN_SPEAKER_COSINE, Diarization, SpeakerTurn
from inference_service.engines.speaker_clustering import UNBOUNDED, SpeakerBounds
from inference_service.engines.whisper import Segment, Word
from inference_service.errors import InvalidOptions
from voxserve_common.client_strings import shown

MAX_SPEAKERS = 32
MAX_KNOWN_SPEAKERS = 4  # as OpenAI's known_speaker_names[]
MAX_NAME_CHARS = 64
MAX_CLIP_SECONDS = 30.0
MIN_CLIP_SECONDS = 0.5
MAX_CLIP_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class KnownSpeaker:
    """A name and a short clip of that speaker alone (container bytes, decoded in the job)."""

    name: str
    audio: bytes = field(repr=False)


@dataclass(frozen=True)
class DiarizationRequest:
    """A transcription's diarization: the model (empty: the service's default), count bounds, known voices."""

    model_id: str = ""
    bounds: SpeakerBounds = UNBOUNDED
    known_speakers: tuple[KnownSpeaker, ...] = ()

    @property
    def clip_bytes(self) -> int:
        return sum(len(k.audio) for k in self.known_speakers)

    def without_clips(self) -> DiarizationRequest:
        """The request with its known speakers' names only: what an ended job keeps."""
        return replace(self, known_speakers=tuple(KnownSpeaker(k.name, b"") for k in self.known_speakers))

    def digest(self) -> bytes:
        """What identifies the request, for a job's fingerprint (the clips by their sha256)."""
        clips = tuple((k.name, hashlib.sha256(k.audio).hexdigest()) for k in self.known_speakers)
        return repr((self.model_id, self.bounds, clips)).encode()


def diarization_request(
    diarize: bool, min_speakers: int, max_speakers: int, model_id: str, known: Sequence[KnownSpeaker]
) -> DiarizationRequest | None:
    """The checked request, or None without ``diarize``.

    Raises:
        InvalidOptions: a count out of range, min above max, too many or badly named known
            speakers, a clip empty or too large, diarization options without ``diarize``.
    """
    if not diarize:
        if min_speakers or max_speakers or model_id or known:
            raise InvalidOptions(
                "min_speakers, max_speakers, diarization_model_id and known_speakers need diarize=true"
            )
        return None
    for name, value in (("min_speakers", min_speakers), ("max_speakers", max_speakers)):
        if not 0 <= value <= MAX_SPEAKERS:
            raise InvalidOptions(f"{name} must be 0-{MAX_SPEAKERS} (0 = unknown), got {value}")
    if min_speakers and max_speakers and min_speakers > max_speakers:
        raise InvalidOptions(f"min_speakers ({min_speakers}) is above max_speakers ({max_speakers})")
    if len(known) > MAX_KNOWN_SPEAKERS:
        raise InvalidOptions(f"at most {MAX_KNOWN_SPEAKERS} known_speakers, got {len(known)}")
    names: set[str] = set()
    for index, speaker in enumerate(known):
        where = f"known_speakers[{index}]"
        name = speaker.name
        if not 1 <= len(name) <= MAX_NAME_CHARS or name != name.strip():
            raise InvalidOptions(
                f"{where}.name must be 1-{MAX_NAME_CHARS} characters without surrounding spaces, got {shown(name)}"
            )
        if any(unicodedata.category(c).startswith("C") for c in name):
            raise InvalidOptions(f"{where}.name has control characters: {shown(name)}")
        if name in names:
            raise InvalidOptions(f"{where}.name {shown(name)} is given twice")
        names.add(name)
        if not speaker.audio:
            raise InvalidOptions(
                f"{where}.audio is empty; send a short clip ({MIN_CLIP_SECONDS:g}-{MAX_CLIP_SECONDS:g} s)"
            )
        if len(speaker.audio) > MAX_CLIP_BYTES:
            raise InvalidOptions(f"{where}.audio is {len(speaker.audio)} bytes; at most {MAX_CLIP_BYTES}")
    return DiarizationRequest(model_id, SpeakerBounds(min_speakers, max_speakers), tuple(known))


def speaker_labels(diarization: Diarization, names: Sequence[str] = (), voices: np.ndarray | None = None) -> list[str]:
    """A label per cluster: SPEAKER_nn numbered by first appearance in the turns, or the name of
    the known voice (rows of ``voices``, unit length) matched one to one at cosine >= the threshold."""
    order: list[int] = []
    for turn in diarization.turns:
        if turn.speaker not in order:
            order.append(turn.speaker)
    order += [c for c in range(diarization.speakers) if c not in order]
    labels = [""] * diarization.speakers
    for number, cluster in enumerate(order):
        labels[cluster] = f"SPEAKER_{number:02d}"
    if names and voices is not None and diarization.speakers:
        similarity = diarization.centroids @ voices.T
        rows, cols = linear_sum_assignment(-similarity)
        for cluster, voice in zip(rows, cols, strict=True):
            if similarity[cluster, voice] >= KNOWN_SPEAKER_COSINE:
                labels[cluster] = names[voice]
    return labels


class SpeakerLabeller:
    """Labels a transcription's segments as they come; numbers the segments it sends (a split adds some)."""

    def __init__(self, turns: Sequence[SpeakerTurn], labels: Sequence[str], keep_words: bool) -> None:
        self.turns = tuple(turns)
        self.speakers = len(labels)
        self.labels = tuple(labels) or ("SPEAKER_00",)
        self.keep_words = keep_words
        self._next_index = 0

    def speaker_at(self, start: float, end: float) -> str:
        """The label of the turn that overlaps [start, end] most; of the nearest turn when none does."""
        if not self.turns:
            return self.labels[0]
        overlaps = [min(end, t.end) - max(start, t.start) for t in self.turns]
        best = int(np.argmax(overlaps))
        if overlaps[best] <= 0:
            middle = (start + end) / 2
            best = int(np.argmin([max(t.start - middle, middle - t.end, 0.0) for t in self.turns]))
        return self.labels[self.turns[best].speaker]

    def split(self, segment: Segment) -> Iterator[Segment]:
        """The segment's parts, one per run of words of one speaker, each labelled and numbered."""
        if not segment.words:
            yield self._numbered(replace(segment, speaker=self.speaker_at(segment.start, segment.end)))
            return
        words = [replace(w, speaker=self.speaker_at(w.start, w.end)) for w in segment.words]
        runs: list[list[Word]] = [[words[0]]]
        for word in words[1:]:
            if word.speaker == runs[-1][-1].speaker:
                runs[-1].append(word)
            else:
                runs.append([word])
        if len(runs) == 1:
            yield self._numbered(replace(segment, words=tuple(words), speaker=words[0].speaker))
            return
        for number, run in enumerate(runs):
            start = segment.start if number == 0 else run[0].start
            end = segment.end if number == len(runs) - 1 else run[-1].end
            text = "".join(w.word for w in run)
            if number == 0 and segment.text.startswith(" ") and not text.startswith(" "):
                text = " " + text
            yield self._numbered(
                replace(segment, start=start, end=end, text=text, words=tuple(run), speaker=run[0].speaker)
            )

    def _numbered(self, segment: Segment) -> Segment:
        index = self._next_index
        self._next_index += 1
        return replace(segment, index=index, words=segment.words if self.keep_words else ())
