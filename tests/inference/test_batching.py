"""The decode scheduler on real tiny.en: jobs served together get what they get alone, fallback,
cancel, lane order, settings. Batches are made deterministic with a long window and a job that
holds the scheduler until the test closes it, never with sleeps."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ctranslate2
import numpy as np
import pytest
from faster_whisper import WhisperModel

from inference_service.audio import decode_audio
from inference_service.engines.batch_ops import (
    FALLBACK_CACHE_BYTES,
    EncodeBudget,
    GenerateCall,
    bucket_prompt,
    encode_budget,
    generate_key,
    last_level_cache_bytes,
    split_batch,
    stack_batch,
)
from inference_service.engines.batching import (
    BatchedJob,
    BatchReport,
    BatchSettings,
    CallTag,
    DecodeScheduler,
    Lane,
    tagged_calls,
)
from inference_service.engines.buffer_decoder import BufferDecoder, DecodeSettings
from inference_service.engines.schedulers import DecodeSchedulers
from inference_service.transcriber import file_lane
from tests.support import DATA_DIR, TINY_EN_DIR, wait_for
from voxserve_common.config import ConfigError
from voxserve_common.errors import Cancelled, FailedPrecondition

LONG_WINDOW_MS = 600_000.0  # the scheduler waits for every open job; the tests release it
TIME_NOISE = 0.02  # one timestamp token; CTranslate2 on the CPU is bit-exact across batch sizes here


class Recorder:
    """The observer: every batch report and waiting count, in order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reports: list[BatchReport] = []
        self.waiting: list[int] = []

    def batch_done(self, report: BatchReport) -> None:
        with self.lock:
            self.reports.append(report)

    def waiting_changed(self, model_id: str, waiting: int) -> None:
        with self.lock:
            self.waiting.append(waiting)

    def batches(self, op: str) -> list[BatchReport]:
        with self.lock:
            return [r for r in self.reports if r.op == op]


@dataclass(frozen=True)
class Job:
    audio: np.ndarray
    options: dict[str, Any]


def audio(name: str) -> np.ndarray:
    return decode_audio((DATA_DIR / name).read_bytes())


MULTI, SHORT = audio("speech_multi.wav"), audio("speech_short.wav")
TRANSCRIPTS_MULTI = json.loads((DATA_DIR / "transcripts.json").read_text())["speech_multi.wav"]
JOBS = {
    "two-windows": Job(np.concatenate([MULTI, MULTI]), {"beam_size": 5}),
    "greedy": Job(MULTI, {"beam_size": 1}),
    "words": Job(SHORT, {"beam_size": 5, "word_timestamps": True}),
    "short-then-long": Job(np.concatenate([SHORT, MULTI]), {"beam_size": 5}),
}


def transcript(model: WhisperModel, job: Job) -> list[dict[str, Any]]:
    segments, _ = model.transcribe(job.audio, **job.options)
    return [
        {
            "start": s.start,
            "end": s.end,
            "text": s.text,
            "temperature": s.temperature,
            "words": [(w.start, w.end, w.word) for w in s.words or ()],
        }
        for s in segments
    ]


@pytest.fixture(scope="module")
def model() -> WhisperModel:
    return WhisperModel(str(TINY_EN_DIR), device="cpu", compute_type="int8", cpu_threads=2)


@pytest.fixture(scope="module")
def alone(model: WhisperModel) -> dict[str, list[dict[str, Any]]]:
    return {name: transcript(model, job) for name, job in JOBS.items()}


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def scheduler(model: WhisperModel, recorder: Recorder) -> Iterator[DecodeScheduler]:
    scheduler = DecodeScheduler("tiny.en", model, BatchSettings(batch_size=8, batch_window_ms=LONG_WINDOW_MS), recorder)
    yield scheduler
    scheduler.close()


def run_jobs(jobs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each callable in its own thread; each name's result or the exception it raised."""
    results: dict[str, Any] = {}

    def run(name: str, work: Callable[[], Any]) -> None:
        try:
            results[name] = work()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            results[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads)
    return results


def transcribe_through(job: BatchedJob, spec: Job) -> Callable[[], list[dict[str, Any]]]:
    def work() -> list[dict[str, Any]]:
        with job:
            return transcript(job.model, spec)

    return work


def assert_same(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [s["text"] for s in got] == [s["text"] for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert a["start"] == pytest.approx(b["start"], abs=TIME_NOISE)
        assert a["end"] == pytest.approx(b["end"], abs=TIME_NOISE)
        assert [w[2] for w in a["words"]] == [w[2] for w in b["words"]]
        assert np.allclose([w[:2] for w in a["words"]], [w[:2] for w in b["words"]], atol=TIME_NOISE)


# --------------------------------------------------------------------------- results as if alone


def test_concurrent_jobs_get_their_transcripts_alone_in_shared_batches(
    scheduler: DecodeScheduler, recorder: Recorder, alone: dict[str, list[dict[str, Any]]]
) -> None:
    handles = {name: scheduler.open_job(name, Lane.FILE, link=f"span-{name}") for name in JOBS}
    results = run_jobs({name: transcribe_through(handles[name], JOBS[name]) for name in JOBS})
    for name in JOBS:
        assert_same(results[name], alone[name])
    first_encode = recorder.batches("encode")[0]
    assert sorted(first_encode.jobs) == sorted(JOBS)  # every job's first window in one encoder call
    assert set(first_encode.links) == {f"span-{name}" for name in JOBS}
    assert first_encode.lanes == (Lane.FILE,) * 4 and len(first_encode.waited_seconds) == 4
    # First windows (no previous text) with beam 5 share one decoder call; greedy is another group.
    first_generates = recorder.batches("generate")[:2]
    assert sorted(len(r.jobs) for r in first_generates) == [1, 3]
    assert max(r.size for r in recorder.reports) > 1
    assert all(r.error is None for r in recorder.reports)
    assert recorder.waiting[-1] == 0 and scheduler.waiting == 0


def test_a_window_that_fails_the_thresholds_is_retried_hotter_without_holding_up_others(
    scheduler: DecodeScheduler, recorder: Recorder, alone: dict[str, list[dict[str, Any]]]
) -> None:
    # log_prob_threshold 0 fails every decode of speech: all six temperatures, one call each.
    strict = Job(SHORT, {"beam_size": 5, "log_prob_threshold": 0.0})
    handles = {
        "strict": scheduler.open_job("strict", Lane.FILE),
        "normal": scheduler.open_job("normal", Lane.FILE),
    }
    results = run_jobs(
        {
            "strict": transcribe_through(handles["strict"], strict),
            "normal": transcribe_through(handles["normal"], JOBS["two-windows"]),
        }
    )
    assert_same(results["normal"], alone["two-windows"])
    assert results["strict"] and all(s["temperature"] == 1.0 for s in results["strict"])
    generates = recorder.batches("generate")
    assert generates[0].size == 2  # both first windows at temperature 0: the strict one failed in it
    strict_calls = [i for i, r in enumerate(generates) if "strict" in r.jobs]
    normal_calls = [i for i, r in enumerate(generates) if "normal" in r.jobs]
    assert len(strict_calls) >= 6
    assert len(normal_calls) >= 2
    # The normal job's later windows were decoded while the strict one still retried its first.
    assert normal_calls[1] < strict_calls[-1]
    assert all(r.size == 1 for r in generates[1:] if "strict" in r.jobs)  # retries sample: a group of their own


def test_live_buffer_decode_through_the_latency_lane_matches_the_direct_decode(
    scheduler: DecodeScheduler, model: WhisperModel
) -> None:
    settings = DecodeSettings(language="en", task="transcribe", beam_size=1, word_timestamps=True, hotwords=None)
    direct = BufferDecoder(model, settings).decode(SHORT, "")
    with scheduler.open_job("live", Lane.LATENCY) as job:
        through = BufferDecoder(job.model, settings).decode(SHORT, "")
    assert through.segments == direct.segments
    assert through.avg_logprob == pytest.approx(direct.avg_logprob)


def test_live_buffers_of_two_streams_in_one_bucket_share_batches_and_decode_as_alone(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    """Buffers of 1.5 s and 2.5 s (with the pad: one 5 s bucket) of two streams: one encoder and
    one decoder call for both, and each gets what it gets decoded alone."""
    settings = DecodeSettings(language="en", task="transcribe", beam_size=1, word_timestamps=True, hotwords=None)
    buffers = {"stream-a": MULTI[: int(1.5 * 16000)], "stream-b": MULTI[int(4.0 * 16000) : int(6.5 * 16000)]}
    alone = {name: BufferDecoder(model, settings).decode(samples, "") for name, samples in buffers.items()}
    holder = scheduler.open_job("holder", Lane.LATENCY)  # holds the first calls until both wait
    jobs = {name: scheduler.open_job(name, Lane.LATENCY) for name in buffers}

    def decode(name: str) -> Callable[[], Any]:
        def work() -> Any:
            with jobs[name] as job:
                return BufferDecoder(job.model, settings).decode(buffers[name], "")

        return work

    results: dict[str, Any] = {}
    threads = [start(decode(name), results, name) for name in buffers]
    wait_for(lambda: scheduler.waiting == 2, message="both streams' encoder calls waiting")
    holder.close()
    for thread in threads:
        thread.join(timeout=120)
    for name in buffers:
        assert results[name].segments == alone[name].segments
        assert results[name].avg_logprob == pytest.approx(alone[name].avg_logprob)
    assert [sorted(r.jobs) for r in recorder.reports[:2]] == [sorted(buffers)] * 2
    assert [r.op for r in recorder.reports[:2]] == ["encode", "generate"]


# --------------------------------------------------------------------------- queue behaviour


def window_features(model: WhisperModel, seconds: float) -> Any:
    features = model.feature_extractor(MULTI[: int(seconds * 16000)], padding=0)[:, : int(seconds * 100)]
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None]))


def encode_through(job: BatchedJob, features: Any, close: bool = True) -> Callable[[], Any]:
    def work() -> Any:
        try:
            return np.asarray(job.model.model.encode(features, to_cpu=False))
        finally:
            if close:
                job.close()

    return work


def start(work: Callable[[], Any], results: dict[str, Any], name: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.update({name: run_jobs({name: work})[name]}))
    thread.start()
    return thread


def test_cancel_removes_waiting_items_at_once_and_the_others_go_on(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    holder = scheduler.open_job("holder", Lane.FILE)  # open, never submits: the scheduler waits
    doomed, kept = scheduler.open_job("doomed", Lane.FILE), scheduler.open_job("kept", Lane.FILE)
    features = window_features(model, 5.0)
    results: dict[str, Any] = {}
    threads = [start(encode_through(doomed, features), results, "doomed")]
    wait_for(lambda: scheduler.waiting == 1, message="doomed's item waiting")
    threads.append(start(encode_through(kept, features), results, "kept"))
    wait_for(lambda: scheduler.waiting == 2, message="both items waiting")

    assert scheduler.cancel("doomed") == 1
    threads[0].join(timeout=30)
    assert isinstance(results["doomed"], Cancelled)
    assert scheduler.waiting == 1 and "kept" not in results  # left without any batch running
    with pytest.raises(Cancelled):
        doomed.model.model.encode(features)  # a cancelled job's later calls fail at once too

    holder.close()
    threads[1].join(timeout=120)
    expected = np.asarray(model.model.encode(features, to_cpu=False))
    assert np.array_equal(results["kept"], expected)
    assert [r.jobs for r in recorder.reports] == [("kept",)]


def test_close_fails_waiting_items_and_refuses_new_jobs(model: WhisperModel) -> None:
    scheduler = DecodeScheduler("tiny.en", model, BatchSettings(batch_size=4, batch_window_ms=LONG_WINDOW_MS))
    scheduler.open_job("holder", Lane.FILE)
    waiting = scheduler.open_job("waiting", Lane.FILE)
    results: dict[str, Any] = {}
    thread = start(encode_through(waiting, window_features(model, 2.0)), results, "waiting")
    wait_for(lambda: scheduler.waiting == 1, message="an item waiting")
    scheduler.close()
    thread.join(timeout=30)
    assert isinstance(results["waiting"], FailedPrecondition)
    with pytest.raises(FailedPrecondition, match="closed"):
        scheduler.open_job("late", Lane.FILE)


def test_latency_items_go_first_and_a_file_job_gets_one_window_per_batch(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    # A batch waits (long window) for every open job of its lane: these hold each lane until closed.
    holder, latency_holder = scheduler.open_job("holder", Lane.FILE), scheduler.open_job("holder", Lane.LATENCY)
    busy, other = scheduler.open_job("busy", Lane.FILE), scheduler.open_job("other", Lane.FILE)
    live = scheduler.open_job("live", Lane.LATENCY)
    window, live_window = window_features(model, 20.0), window_features(model, 4.0)
    results: dict[str, Any] = {}
    threads = []
    # Two windows of one file job (two callers), then another job's, then a live buffer last.
    for name, work in [
        ("busy-1", encode_through(busy, window, close=False)),
        ("busy-2", encode_through(busy, window, close=False)),
        ("other", encode_through(other, window)),
        ("live", encode_through(live, live_window)),
    ]:
        threads.append(start(work, results, name))
        count = len(threads)
        wait_for(lambda: scheduler.waiting == count, message=f"{name} waiting")  # noqa: B023 - called at once
    latency_holder.close()
    holder.close()
    for thread in threads:
        thread.join(timeout=120)
    busy.close()
    assert [(r.jobs, r.lanes) for r in recorder.reports] == [
        (("live",), (Lane.LATENCY,)),  # the newest item, but latency-bound: first
        (("busy", "other"), (Lane.FILE, Lane.FILE)),  # busy's second window waits for the next batch
        (("busy",), (Lane.FILE,)),
    ]
    expected = np.asarray(model.model.encode(window, to_cpu=False))
    assert all(np.array_equal(results[name], expected) for name in ("busy-1", "busy-2", "other"))


def test_a_latency_batch_takes_no_file_window_of_the_same_shape(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    holder, latency_holder = scheduler.open_job("holder", Lane.FILE), scheduler.open_job("holder", Lane.LATENCY)
    window = window_features(model, 20.0)  # one key: the same input shape
    results: dict[str, Any] = {}
    threads = [
        start(encode_through(scheduler.open_job("file", Lane.FILE), window), results, "file"),
        start(encode_through(scheduler.open_job("short", Lane.LATENCY), window), results, "short"),
    ]
    wait_for(lambda: scheduler.waiting == 2, message="both windows waiting")
    latency_holder.close()
    holder.close()
    for thread in threads:
        thread.join(timeout=120)
    # A file window beside it would double the short request's encode (batches cost per item on a CPU).
    assert [(r.jobs, r.lanes) for r in recorder.reports] == [(("short",), (Lane.LATENCY,)), (("file",), (Lane.FILE,))]
    expected = np.asarray(model.model.encode(window, to_cpu=False))
    assert np.array_equal(results["file"], expected) and np.array_equal(results["short"], expected)


def test_a_job_moved_to_the_file_lane_sends_its_later_calls_there(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    """A request's first utterance is latency-bound and its windows are file work, in one job."""
    request, other = scheduler.open_job("request", Lane.LATENCY), scheduler.open_job("other", Lane.FILE)
    run_jobs({"first": encode_through(request, window_features(model, 4.0), close=False)})
    request.move_to(Lane.FILE)
    window = window_features(model, 20.0)
    results = run_jobs({"request": encode_through(request, window), "other": encode_through(other, window)})
    assert [(sorted(r.jobs), r.lanes) for r in recorder.reports] == [
        (["request"], (Lane.LATENCY,)),
        (["other", "request"], (Lane.FILE, Lane.FILE)),  # one window each, side by side
    ]
    assert all(np.array_equal(got, np.asarray(model.model.encode(window))) for got in results.values())


def test_a_zero_window_never_waits_for_jobs_that_have_nothing_queued(model: WhisperModel, recorder: Recorder) -> None:
    scheduler = DecodeScheduler("tiny.en", model, BatchSettings(batch_size=8, batch_window_ms=0), recorder)
    idle = scheduler.open_job("idle", Lane.FILE)  # with a window, the scheduler would wait for it
    job = scheduler.open_job("job", Lane.FILE)
    results = run_jobs({"job": encode_through(job, window_features(model, 1.0))})
    idle.close()
    scheduler.close()
    assert isinstance(results["job"], np.ndarray)
    assert [r.jobs for r in recorder.reports] == [("job",)]


def test_a_batch_never_exceeds_batch_size(model: WhisperModel, recorder: Recorder) -> None:
    scheduler = DecodeScheduler("tiny.en", model, BatchSettings(batch_size=2, batch_window_ms=LONG_WINDOW_MS), recorder)
    jobs = [scheduler.open_job(f"job-{i}", Lane.LATENCY) for i in range(3)]
    features = window_features(model, 1.0)
    results = run_jobs({job.key: encode_through(job, features) for job in jobs})
    scheduler.close()
    assert sorted(r.size for r in recorder.reports) == [1, 2]
    assert all(not isinstance(value, Exception) for value in results.values())


# --------------------------------------------------------------------------- one thread: follow-up calls


class GatedWhisper:
    """The real CTranslate2 model; an ``encode`` of ``gated_frames`` frames first says it started
    and then waits for ``release``: the test knows that batch is running."""

    def __init__(self, model: Any, gated_frames: int) -> None:
        self._model = model
        self.gated_frames = gated_frames
        self.started = threading.Event()
        self.release = threading.Event()

    def encode(self, features: Any, to_cpu: bool = False) -> Any:
        if features.shape[2] == self.gated_frames:
            self.started.set()
            assert self.release.wait(120), "the test never released the gated batch"
        return self._model.encode(features, to_cpu=to_cpu)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def gated(model: WhisperModel, seconds: float) -> tuple[WhisperModel, GatedWhisper]:
    copied = copy.copy(model)
    copied.model = GatedWhisper(model.model, int(seconds * 100))
    return copied, copied.model


def gated_scheduler(
    model: WhisperModel, recorder: Recorder, gated_seconds: float = 4.0, **timing: float
) -> tuple[DecodeScheduler, GatedWhisper]:
    """A scheduler with a zero window over ``model``, whose encodes of ``gated_seconds`` wait for the test."""
    gated_model, gate = gated(model, gated_seconds)
    return DecodeScheduler(
        "tiny.en", gated_model, BatchSettings(batch_size=8, batch_window_ms=0), recorder, **timing
    ), gate


def two_calls_then_close(job: BatchedJob, features: Any, tag: CallTag | None = None) -> Callable[[], list[Any]]:
    """A job that sends its next call as soon as its first one returns (an encode then a generate)."""

    def work() -> list[Any]:
        with job, tagged_calls(tag or CallTag()):
            return [np.asarray(job.model.model.encode(features, to_cpu=False)) for _ in range(2)]

    return work


def tagged(work: Callable[[], Any], tag: CallTag) -> Callable[[], Any]:
    def run() -> Any:
        with tagged_calls(tag):
            return work()

    return run


def file_window_behind(
    scheduler: DecodeScheduler, gate: GatedWhisper, latency: BatchedJob, short_window: Any, window: Any
) -> dict[str, Any]:
    """``latency`` sends two calls back to back (the first one gated); a file window arrives while
    the first runs. The results by job key, once both are done and the scheduler closed."""
    results: dict[str, Any] = {}
    threads = [start(two_calls_then_close(latency, short_window), results, latency.key)]
    assert gate.started.wait(60), "the latency call never started"
    threads.append(start(encode_through(scheduler.open_job("file", Lane.FILE), window), results, "file"))
    wait_for(lambda: scheduler.waiting == 1, message="the file window waiting while the latency call runs")
    gate.release.set()
    for thread in threads:
        thread.join(timeout=120)
    scheduler.close()
    return results


@pytest.mark.parametrize("replicas", ["model", "two_replicas"])
def test_a_file_window_waits_for_a_latency_jobs_next_call(
    replicas: str, request: pytest.FixtureRequest, recorder: Recorder
) -> None:
    """On one thread, and with two (where file batches also wait while latency work runs)."""
    model: WhisperModel = request.getfixturevalue(replicas)
    # However slow the machine, the file window waits for the live call.
    scheduler, gate = gated_scheduler(model, recorder, follow_up_seconds=600.0, file_patience_seconds=600.0)
    assert scheduler.lanes_apart is (replicas == "two_replicas")
    window, live_window = window_features(model, 20.0), window_features(model, 4.0)
    results = file_window_behind(scheduler, gate, scheduler.open_job("live", Lane.LATENCY), live_window, window)
    # Without the hold the file window would start in the gap between the live job's two calls.
    assert [r.jobs for r in recorder.reports] == [("live",), ("live",), ("file",)]
    assert recorder.reports[2].started_ns >= recorder.reports[1].ended_ns
    assert np.array_equal(results["file"], np.asarray(model.model.encode(window, to_cpu=False)))
    assert all(np.array_equal(got, np.asarray(model.model.encode(live_window))) for got in results["live"])


def test_drafts_wait_for_a_live_finals_next_call_and_the_hold_ends_when_it_closes(
    model: WhisperModel, recorder: Recorder
) -> None:
    scheduler, gate = gated_scheduler(model, recorder, follow_up_seconds=600.0)
    final, draft = scheduler.open_job("final", Lane.LATENCY), scheduler.open_job("draft", Lane.LATENCY)
    results: dict[str, Any] = {}
    threads = [start(two_calls_then_close(final, window_features(model, 4.0), CallTag(urgent=True)), results, "final")]
    assert gate.started.wait(60), "the final's call never started"
    threads.append(start(encode_through(draft, window_features(model, 3.0)), results, "draft"))
    wait_for(lambda: scheduler.waiting == 1, message="the draft waiting while the final's call runs")
    gate.release.set()
    for thread in threads:
        thread.join(timeout=120)  # the final's job closed after its second call: the draft ran
    scheduler.close()
    assert [r.jobs for r in recorder.reports] == [("final",), ("final",), ("draft",)]
    assert isinstance(results["draft"], np.ndarray)


def test_an_urgent_call_goes_first_in_a_batch_of_its_own(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    holder = scheduler.open_job("holder", Lane.LATENCY)
    features = window_features(model, 4.0)
    names = ["draft-1", "draft-2", "final"]
    jobs = {name: scheduler.open_job(name, Lane.LATENCY) for name in names}
    results: dict[str, Any] = {}
    threads = []
    for count, name in enumerate(names, 1):
        work = encode_through(jobs[name], features)
        threads.append(start(tagged(work, CallTag(urgent=name == "final")), results, name))
        wait_for(lambda: scheduler.waiting == count, message=f"{name} waiting")  # noqa: B023 - called at once
    holder.close()
    for thread in threads:
        thread.join(timeout=120)
    # Same shape, same key: without the rule the drafts would ride in the final's batch.
    assert [r.jobs for r in recorder.reports] == [("final",), ("draft-1", "draft-2")]
    expected = np.asarray(model.model.encode(features, to_cpu=False))
    assert all(np.array_equal(results[name], expected) for name in names)


def test_withdrawn_calls_leave_and_the_jobs_other_decodes_go_on(
    scheduler: DecodeScheduler, model: WhisperModel, recorder: Recorder
) -> None:
    holder = scheduler.open_job("holder", Lane.LATENCY)
    stream = scheduler.open_job("stream", Lane.LATENCY)  # one live stream: a draft, then its final
    draft_tag, final_tag = CallTag(), CallTag(urgent=True)
    features = window_features(model, 4.0)
    results: dict[str, Any] = {}
    draft = start(tagged(encode_through(stream, features, close=False), draft_tag), results, "draft")
    wait_for(lambda: scheduler.waiting == 1, message="the draft waiting")

    assert scheduler.withdraw(draft_tag) == 1
    draft.join(timeout=30)
    assert isinstance(results["draft"], Cancelled) and scheduler.waiting == 0
    with pytest.raises(Cancelled), tagged_calls(draft_tag):
        stream.model.model.encode(features)  # the withdrawn decode's later calls fail at once

    final = start(tagged(encode_through(stream, features), final_tag), results, "final")
    wait_for(lambda: scheduler.waiting == 1, message="the final waiting")
    holder.close()
    final.join(timeout=120)
    assert np.array_equal(results["final"], np.asarray(model.model.encode(features, to_cpu=False)))
    assert [r.jobs for r in recorder.reports] == [("stream",)]


def test_a_jobs_own_follow_up_time_wins_over_the_schedulers(model: WhisperModel, recorder: Recorder) -> None:
    """A request's job holds file work for its own time (the scheduler's is zero here); a live
    stream's job, opened without one, holds for the scheduler's."""
    scheduler, gate = gated_scheduler(model, recorder, follow_up_seconds=0.0, file_patience_seconds=600.0)
    request = scheduler.open_job("request", Lane.LATENCY, follow_up_seconds=600.0)
    assert (request.follow_up_seconds, scheduler.open_job("live", Lane.LATENCY).follow_up_seconds) == (600.0, 0.0)
    window, short_window = window_features(model, 20.0), window_features(model, 4.0)
    results = file_window_behind(scheduler, gate, request, short_window, window)
    # With the scheduler's zero hold, the file window would start between the request's two calls.
    assert [r.jobs for r in recorder.reports] == [("request",), ("request",), ("file",)]
    assert np.array_equal(results["file"], np.asarray(model.model.encode(window, to_cpu=False)))


def test_a_follow_up_hold_lasts_at_most_follow_up_seconds(model: WhisperModel, recorder: Recorder) -> None:
    scheduler, gate = gated_scheduler(model, recorder, follow_up_seconds=0.05)
    silent = scheduler.open_job("silent", Lane.LATENCY)  # served once, then stays open without a next call
    results: dict[str, Any] = {}
    first = start(encode_through(silent, window_features(model, 4.0), close=False), results, "silent")
    assert gate.started.wait(60), "the latency call never started"
    file = start(encode_through(scheduler.open_job("file", Lane.FILE), window_features(model, 2.0)), results, "file")
    wait_for(lambda: scheduler.waiting == 1, message="the file window waiting")
    gate.release.set()
    first.join(timeout=120)
    file.join(timeout=120)  # would hang if the hold waited for the open job's next call forever
    silent.close()
    scheduler.close()
    assert [r.jobs for r in recorder.reports] == [("silent",), ("file",)]
    assert isinstance(results["file"], np.ndarray)


# --------------------------------------------------------------------------- two replicas: lanes apart


@pytest.fixture(scope="module")
def two_replicas() -> WhisperModel:
    return WhisperModel(str(TINY_EN_DIR), device="cpu", compute_type="int8", cpu_threads=1, num_workers=2)


def test_with_two_replicas_a_latency_call_runs_while_a_file_window_decodes(
    two_replicas: WhisperModel, recorder: Recorder
) -> None:
    scheduler, gate = gated_scheduler(two_replicas, recorder, gated_seconds=20.0)
    assert scheduler.lanes_apart
    window, live_window = window_features(two_replicas, 20.0), window_features(two_replicas, 4.0)
    results: dict[str, Any] = {}
    file_thread = start(encode_through(scheduler.open_job("file", Lane.FILE), window), results, "file")
    assert gate.started.wait(60), "the file window never started"

    live = run_jobs({"live": encode_through(scheduler.open_job("live", Lane.LATENCY), live_window)})
    assert "file" not in results  # the live call ended while the file window was still running
    gate.release.set()
    file_thread.join(timeout=120)
    scheduler.close()
    assert np.array_equal(live["live"], np.asarray(two_replicas.model.encode(live_window, to_cpu=False)))
    assert np.array_equal(results["file"], np.asarray(two_replicas.model.encode(window, to_cpu=False)))
    live_report, file_report = recorder.reports
    assert (live_report.jobs, file_report.jobs) == (("live",), ("file",))
    assert file_report.started_ns < live_report.started_ns and live_report.ended_ns < file_report.ended_ns


def test_with_two_replicas_a_file_window_past_its_patience_runs_beside_latency_work(
    two_replicas: WhisperModel, recorder: Recorder
) -> None:
    scheduler, gate = gated_scheduler(two_replicas, recorder, file_patience_seconds=0.2)
    window, live_window = window_features(two_replicas, 20.0), window_features(two_replicas, 4.0)
    results: dict[str, Any] = {}
    live_thread = start(encode_through(scheduler.open_job("live", Lane.LATENCY), live_window), results, "live")
    assert gate.started.wait(60), "the live call never started"
    file = run_jobs({"file": encode_through(scheduler.open_job("file", Lane.FILE), window)})
    assert "live" not in results  # the file window ran and ended while the live call still ran
    gate.release.set()
    live_thread.join(timeout=120)
    scheduler.close()
    assert np.array_equal(file["file"], np.asarray(two_replicas.model.encode(window, to_cpu=False)))
    assert [r.jobs for r in recorder.reports] == [("file",), ("live",)]


def test_a_request_that_fits_one_window_is_latency_bound() -> None:
    assert file_lane(11.0) is Lane.LATENCY and file_lane(30.0) is Lane.LATENCY
    assert file_lane(30.5) is Lane.FILE and file_lane(7200.0) is Lane.FILE


# --------------------------------------------------------------------------- prompts cut to a bucket

PREV, SOT, NO_TIMESTAMPS = 50360, 50257, 50362  # tiny.en's <|startofprev|>, <|startoftranscript|>, <|notimestamps|>


def prompt_of(previous: int) -> list[int]:
    """A window's prompt with ``previous`` tokens of previous text (token i is 1000 + i)."""
    return ([PREV, *range(1000, 1000 + previous)] if previous else []) + [SOT, NO_TIMESTAMPS]


@pytest.mark.parametrize(
    ("previous", "step", "kept"),
    [
        (0, 32, 0),  # the first window: no previous text
        (20, 32, 20),  # shorter than one step: whole
        (40, 32, 32),
        (63, 32, 32),
        (64, 32, 64),
        (200, 32, 192),
        (223, 32, 223),  # at faster-whisper's cap: whole (every long file's later windows batch)
        (40, 0, 40),  # step 0: faster-whisper's prompt as it is
        (150, 64, 128),
    ],
)
def test_a_prompts_previous_text_is_cut_at_its_oldest_end_to_a_multiple_of_the_step(
    previous: int, step: int, kept: int
) -> None:
    cut = bucket_prompt(prompt_of(previous), SOT, PREV, step, cap=223)
    expected = ([PREV, *range(1000 + previous - kept, 1000 + previous)] if previous else []) + [SOT, NO_TIMESTAMPS]
    assert cut == expected


def test_the_token_ids_of_the_bucket_are_tiny_ens(model: WhisperModel) -> None:
    tokens = model.hf_tokenizer
    ids = [tokens.token_to_id(t) for t in ("<|startofprev|>", "<|startoftranscript|>", "<|notimestamps|>")]
    assert ids == [PREV, SOT, NO_TIMESTAMPS]


def test_prompts_of_one_bucket_share_a_decoder_batch_and_a_callers_own_prompt_stays_whole(
    model: WhisperModel, recorder: Recorder
) -> None:
    """Previous texts of 40 and 50 tokens (step 32: both cut to their last 32) decode in one
    batch, each as its cut prompt decodes alone; a job with the caller's own prompt text
    (``keep_prompt_text``) decodes its 40 tokens whole, in a batch of its own."""
    settings = BatchSettings(batch_size=8, batch_window_ms=LONG_WINDOW_MS, prompt_bucket_tokens=32)
    scheduler = DecodeScheduler("tiny.en", model, settings, recorder)
    output = model.model.encode(window_features(model, 30.0), to_cpu=False)
    text = model.hf_tokenizer.encode(" " + " ".join([TRANSCRIPTS_MULTI] * 5), add_special_tokens=False).ids
    assert len(text) >= 240
    prompts = {
        "a": [PREV, *text[:40], SOT, NO_TIMESTAMPS],
        "b": [PREV, *text[100:150], SOT, NO_TIMESTAMPS],
        "own": [PREV, *text[200:240], SOT, NO_TIMESTAMPS],
    }
    options = {"beam_size": 2, "max_length": 60, "return_scores": True}
    jobs = {name: scheduler.open_job(name, Lane.FILE, keep_prompt_text=name == "own") for name in prompts}

    def decode(name: str) -> Callable[[], Any]:
        def work() -> Any:
            with jobs[name] as job:
                return job.model.model.generate(output, [prompts[name]], **options)[0]

        return work

    try:
        results = run_jobs({name: decode(name) for name in prompts})
    finally:
        scheduler.close()
    cut = {"a": [PREV, *text[8:40]], "b": [PREV, *text[118:150]], "own": [PREV, *text[200:240]]}
    for name, head in cut.items():
        alone = model.model.generate(output, [[*head, SOT, NO_TIMESTAMPS]], **options)[0]
        assert results[name].sequences_ids == alone.sequences_ids, name
        assert results[name].scores == pytest.approx(alone.scores, abs=1e-4)
    assert sorted(sorted(r.jobs) for r in recorder.batches("generate")) == [["a", "b"], ["own"]]
    assert [job.prompt_bucket for job in jobs.values()] == [32, 32, 0]


# --------------------------------------------------------------------------- keys and arrays


def test_generate_keys_group_prompts_laid_out_alike(model: WhisperModel) -> None:
    sot = model.hf_tokenizer.token_to_id("<|startoftranscript|>")
    prev = model.hf_tokenizer.token_to_id("<|startofprev|>")
    output = model.model.encode(window_features(model, 1.0), to_cpu=False)
    options = {"beam_size": 5, "suppress_tokens": [-1]}

    def key(prompt: list[int], **changes: Any) -> Any:
        return generate_key(GenerateCall(output, prompt, {**options, **changes}), sot)

    assert key([prev, 10, 11, sot]) == key([prev, 20, 21, sot])  # other words, same layout
    assert key([prev, 10, sot]) != key([prev, 10, 11, sot])  # <|startoftranscript|> elsewhere
    assert key([sot]) != key([sot, 50362])  # more task tokens after it
    assert key([sot]) != key([sot], beam_size=1)
    assert key([sot]) != key([sot], suppress_tokens=[-1, 7])


def test_split_and_stack_through_torch_match_numpy(model: WhisperModel) -> None:
    """The CUDA path (torch tensors) run on CPU tensors: the same arrays as the numpy path."""
    features = np.concatenate([np.asarray(window_features(model, 1.0))] * 3)
    output = model.model.encode(ctranslate2.StorageView.from_array(features), to_cpu=False)
    numpy_parts = split_batch(output, 3)
    torch_parts = split_batch(output, 3, via_torch=True)
    for a, b in zip(numpy_parts, torch_parts, strict=True):
        assert a.shape == [1, *output.shape[1:]]
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(stack_batch(torch_parts, via_torch=True)), np.asarray(output))
    assert np.array_equal(np.asarray(stack_batch(numpy_parts)), np.asarray(output))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("size", "window", "field"),
    [
        (0, 5.0, "batch_size"),
        (-3, 5.0, "batch_size"),
        (8, -1.0, "batch_window_ms"),
        (8, float("nan"), "batch_window_ms"),
        (8, float("inf"), "batch_window_ms"),
    ],
)
def test_bad_settings_name_the_field(size: int, window: float, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BatchSettings(batch_size=size, batch_window_ms=window)


def test_a_negative_prompt_bucket_names_the_field() -> None:
    with pytest.raises(ConfigError, match="prompt_bucket_tokens"):
        BatchSettings(batch_size=8, batch_window_ms=10.0, prompt_bucket_tokens=-1)


def test_zero_window_is_valid() -> None:
    assert BatchSettings(batch_size=1, batch_window_ms=0).batch_window_ms == 0


# --------------------------------------------------------------------------- encoder batches on the CPU

TINY_BUDGET = EncodeBudget(cache_bytes=32 << 20, heads=6)  # tiny.en on the 32 MiB L3 it was measured on


def long_features(model: WhisperModel, seconds: float) -> Any:
    speech = np.tile(MULTI, 2)
    features = model.feature_extractor(speech[: int(seconds * 16000)], padding=0)[:, : int(seconds * 100)]
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None]))


@pytest.mark.parametrize(
    ("mel_frames", "windows"),
    [(3000, 1), (2000, 1), (1500, 2), (1250, 3), (1000, 5), (500, 22)],
)
def test_the_encode_budget_allows_the_batches_that_were_faster_than_one_by_one(mel_frames: int, windows: int) -> None:
    """The measured table of ``EncodeBudget``: 30 s and 20 s windows alone, 15 s in twos, 12.5 s in threes."""
    assert TINY_BUDGET.windows(mel_frames) == windows


@pytest.mark.parametrize(("seconds", "sizes"), [(30.0, [1, 1, 1]), (15.0, [1, 2])])
def test_cpu_encoder_batches_keep_to_the_cache(
    model: WhisperModel, recorder: Recorder, seconds: float, sizes: list[int]
) -> None:
    scheduler = DecodeScheduler(
        "tiny.en",
        model,
        BatchSettings(batch_size=8, batch_window_ms=LONG_WINDOW_MS),
        recorder,
        encode_budget=TINY_BUDGET,
    )
    jobs = [scheduler.open_job(f"job-{i}", Lane.FILE) for i in range(3)]
    features = long_features(model, seconds)
    results = run_jobs({job.key: encode_through(job, features) for job in jobs})
    scheduler.close()
    assert sorted(r.size for r in recorder.reports) == sizes
    expected = np.asarray(model.model.encode(features, to_cpu=False))
    assert all(np.array_equal(got, expected) for got in results.values())


def test_without_a_budget_long_windows_share_one_encoder_call(model: WhisperModel, recorder: Recorder) -> None:
    """What a GPU gets (``encode_budget`` None): the three 30 s windows in one call."""
    scheduler = DecodeScheduler("tiny.en", model, BatchSettings(batch_size=8, batch_window_ms=LONG_WINDOW_MS), recorder)
    jobs = [scheduler.open_job(f"job-{i}", Lane.FILE) for i in range(3)]
    results = run_jobs({job.key: encode_through(job, long_features(model, 30.0)) for job in jobs})
    scheduler.close()
    assert [r.size for r in recorder.reports] == [3]
    assert all(isinstance(value, np.ndarray) for value in results.values())


def test_the_budget_of_a_cpu_model_counts_its_heads_and_a_gpu_model_has_none(model: WhisperModel) -> None:
    budget = encode_budget(model.model)
    assert budget == EncodeBudget(last_level_cache_bytes(), heads=6)  # tiny: 384 wide

    class OnTheGpu:
        device = "cuda"

    assert encode_budget(OnTheGpu()) is None
    schedulers = DecodeSchedulers(BatchSettings(batch_size=8, batch_window_ms=10.0))
    scheduler = schedulers.make("tiny.en", model)
    try:
        assert scheduler.encode_budget == budget  # the service's schedulers keep to it on the CPU
    finally:
        scheduler.close()


def test_the_last_level_cache_is_read_from_sysfs(tmp_path: Path) -> None:
    for index, (level, kind, size) in enumerate(
        [("1", "Data", "32K"), ("1", "Instruction", "32K"), ("2", "Unified", "512K"), ("3", "Unified", "16384K")]
    ):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "type").write_text(kind + "\n")
        (folder / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 16 << 20
    assert last_level_cache_bytes(tmp_path / "missing") == FALLBACK_CACHE_BYTES
