"""Speaker labels without a model: clustering of embeddings, turns, labels, segment splits, request checks."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service.engines.diarization import (
    Diarization,
    SpeakerTurn,
    merged_turns,
    speech_windows,
    turns_from_windows,
)
from inference_service.engines.speaker_clustering import SpeakerBounds, cluster_embeddings
from inference_service.engines.whisper import Segment, Word
from inference_service.errors import InvalidOptions
from inference_service.speakers import KnownSpeaker, SpeakerLabeller, diarization_request, speaker_labels
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.errors import InvalidArgument


def voices(counts: list[int], seed: int = 0, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings around len(counts) random directions (192-d), and their true voice per row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(counts), 192))
    rows, truth = [], []
    for voice, count in enumerate(counts):
        rows.append(
            centres[voice] + spread * np.linalg.norm(centres[voice]) / np.sqrt(192) * rng.normal(size=(count, 192))
        )
        truth += [voice] * count
    return np.concatenate(rows), np.array(truth)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return len(set(zip(a.tolist(), b.tolist(), strict=True))) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("counts", [[30, 25], [20, 20, 20], [40, 12, 15, 18]])
def test_clustering_counts_distinct_voices(counts: list[int]) -> None:
    embeddings, truth = voices(counts)
    labels = cluster_embeddings(embeddings)
    assert same_partition(labels, truth)


def test_clustering_honours_bounds() -> None:
    embeddings, _ = voices([20, 20, 20])
    assert len(set(cluster_embeddings(embeddings, SpeakerBounds(max_speakers=2)).tolist())) <= 2
    assert len(set(cluster_embeddings(embeddings, SpeakerBounds(2, 2)).tolist())) == 2
    embeddings, _ = voices([60])
    assert len(set(cluster_embeddings(embeddings, SpeakerBounds(min_speakers=2)).tolist())) == 2
    assert cluster_embeddings(embeddings[:5]).tolist() == [0] * 5  # too few to count: one voice
    assert cluster_embeddings(np.zeros((0, 192))).tolist() == []


def test_windows_turns_and_merging() -> None:
    windows = speech_windows([(0.0, 3.0), (5.0, 5.8)])
    assert windows[0] == (0.0, 1.5) and windows[-1] == (5.0, 5.8)
    assert all(start >= 0 and end - start <= 1.5 + 1e-9 for start, end in windows)
    turns = turns_from_windows([(0.0, 1.5), (0.6, 2.1), (1.2, 2.7)], np.array([0, 0, 1]))
    assert turns == [SpeakerTurn(0.0, 1.65, 0), SpeakerTurn(1.65, 2.7, 1)]
    # A gap under 4 s inside one speaker's turn is filled; a turn of 0.78 s or less goes.
    merged = merged_turns([SpeakerTurn(0, 2, 0), SpeakerTurn(3, 5, 0), SpeakerTurn(5, 5.5, 1), SpeakerTurn(5.5, 8, 0)])
    assert merged == [SpeakerTurn(0, 8, 0)]


def word(start: float, end: float, text: str) -> Word:
    return Word(start, end, text, 0.9)


def test_segment_split_where_the_speaker_changes() -> None:
    diarization = Diarization((SpeakerTurn(0, 2, 1), SpeakerTurn(2, 4, 0), SpeakerTurn(4.5, 6, 1)), np.eye(2, 192))
    labels = speaker_labels(diarization)
    assert labels == ["SPEAKER_01", "SPEAKER_00"]  # numbered by first appearance
    labeller = SpeakerLabeller(diarization.turns, labels, keep_words=True)
    words = (word(0.1, 0.5, " Hello"), word(0.6, 1.9, " there."), word(2.2, 2.6, " Hi,"), word(2.7, 3.5, " you."))
    segment = Segment(7, 0.0, 3.6, " Hello there. Hi, you.", words, -0.2, 0.01)
    first, second = labeller.split(segment)
    assert (first.index, first.start, first.end, first.text, first.speaker) == (
        0,
        0.0,
        1.9,
        " Hello there.",
        "SPEAKER_00",
    )
    assert (second.index, second.start, second.end, second.text, second.speaker) == (
        1,
        2.2,
        3.6,
        " Hi, you.",
        "SPEAKER_01",
    )
    assert {w.speaker for w in first.words} == {"SPEAKER_00"} and {w.speaker for w in second.words} == {"SPEAKER_01"}
    # A word in no turn takes the nearest; words are dropped when the client did not ask for them.
    plain = SpeakerLabeller(diarization.turns, labels, keep_words=False)
    [only] = plain.split(Segment(0, 4.05, 4.3, " Yes.", (word(4.05, 4.3, " Yes."),), -0.1, 0.0))
    assert only.speaker == "SPEAKER_01" and only.words == () and only.index == 0


def test_known_voices_named_one_to_one_above_the_threshold() -> None:
    centroids = np.eye(3, 192)
    diarization = Diarization((SpeakerTurn(0, 1, 2), SpeakerTurn(1, 2, 0), SpeakerTurn(2, 3, 1)), centroids)
    near = np.eye(3, 192)[[0, 2]] * 0.9 + 0.1 * np.eye(3, 192)[[1, 1]]
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    assert speaker_labels(diarization, ["Ana", "Bo"], near) == ["Ana", "SPEAKER_02", "Bo"]
    far = np.eye(5, 192)[[3, 4]]  # no cluster's voice
    assert speaker_labels(diarization, ["Ana", "Bo"], far) == ["SPEAKER_01", "SPEAKER_02", "SPEAKER_00"]


def test_diarization_request_checks() -> None:
    assert diarization_request(False, 0, 0, "", []) is None
    request = diarization_request(True, 2, 3, "", [KnownSpeaker("Ana", b"x")])
    assert request is not None and request.bounds == SpeakerBounds(2, 3)
    for args, fragment in [
        ((True, 4, 2, "", []), "above max_speakers"),
        ((True, 0, 33, "", []), "max_speakers must be 0-32"),
        ((False, 0, 0, "m", []), "need diarize=true"),
        ((True, 0, 0, "", [KnownSpeaker("A\tB", b"x")]), "control characters"),
        ((True, 0, 0, "", [KnownSpeaker("A", b"")]), "empty"),
        ((True, 0, 0, "", [KnownSpeaker(f"P{n}", b"x") for n in range(5)]), "at most 4"),
    ]:
        with pytest.raises(InvalidOptions, match=fragment):
            diarization_request(*args)  # type: ignore[arg-type]


def test_an_ended_job_lets_go_of_the_known_speakers_clips() -> None:
    from inference_service.engines.whisper import TranscribeOptions
    from inference_service.jobs import Job, JobRequest, JobState

    request = diarization_request(True, 0, 0, "", [KnownSpeaker("Ana", b"x" * 50_000), KnownSpeaker("Bo", b"y" * 30)])
    job = Job("j1", JobRequest("m", b"a" * 1000, TranscribeOptions(), diarization=request), 100, False)
    fingerprint = job.fingerprint
    assert job.held_bytes() >= 51_030
    job.finish(JobState.COMPLETED)
    assert job.request.diarization is not None
    assert [(k.name, k.audio) for k in job.request.diarization.known_speakers] == [("Ana", b""), ("Bo", b"")]
    assert job.held_bytes() < 50_000 and job.fingerprint == fingerprint


@pytest.mark.parametrize(
    "options",
    [
        {"diarize": True},
        {"min_speakers": 2},
        {"max_speakers": 3},
        {"diarization_model_id": "../../etc/passwd"},
        {"known_speakers": [pb.KnownSpeaker(name="Ann", audio=b"RIFF")]},
    ],
)
def test_live_streams_refuse_every_diarization_option(options: dict[str, object]) -> None:
    from inference_service.wire import stream_request_from_config

    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000, options=pb.TranscribeOptions(**options))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="not available for live streams"):
        stream_request_from_config(config, "whisper-tiny.en")
    plain = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000)
    assert stream_request_from_config(plain, "whisper-tiny.en").model_id == "whisper-tiny.en"
