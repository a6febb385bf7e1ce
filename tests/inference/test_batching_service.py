"""Batch decoding across requests on a real server (tiny.en, real speech): each request gets what it
gets alone, batches really form, a short request is not starved by long ones, a cancel takes its
waiting decodes off the queue, live streams go on beside file jobs, bad settings stop the service.

Batches are made likely with the longest window (the scheduler waits for every open job) and made
certain where a test needs it by a handle that holds the scheduler; nothing here measures time."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import wave
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from inference_service.engines.batching import BatchedJob, BatchSettings, Lane
from inference_service.engines.whisper import WhisperEngine
from inference_service.transcriber import REQUEST_FOLLOW_UP_SECONDS
from tests.inference.test_live_stream import config as live_config
from tests.inference.test_live_stream import pcm, results
from tests.support import DATA_DIR, REPO_ROOT, TRANSCRIPTS, InferenceHandle, wait_for, word_error_rate
from voxctl.live import live_requests
from voxserve.inference.v1 import inference_pb2 as pb

MODEL = "whisper-tiny.en"
MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()
SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
TIME_NOISE = 0.02  # one timestamp token; on the CPU batched results were bit-identical to alone
LONGEST_WINDOW_MS = 1000.0


def repeated_wav(data: bytes, times: int) -> bytes:
    """A WAV file's audio ``times`` times over, in one WAV."""
    with wave.open(io.BytesIO(data)) as source:
        params = source.getparams()
        frames = source.readframes(source.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setparams(params)
        target.writeframes(frames * times)
    return out.getvalue()


# Files of different lengths (3 s to 75 s: 1 to 3 windows) with options that differ.
REQUESTS: dict[str, tuple[bytes, dict[str, Any]]] = {
    "three-windows-beam5": (repeated_wav(MULTI, 3), {"beam_size": 5}),
    "one-window-greedy": (MULTI, {"beam_size": 1}),
    "short-words": (SHORT, {"word_timestamps": True}),
    "two-windows-prompt": (repeated_wav(MULTI, 2), {"initial_prompt": "Minutes of the weekly meeting."}),
}


def request(audio: bytes, job_id: str = "", **options: Any) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(audio=audio, options=pb.TranscribeOptions(job_id=job_id, **options))


def segments(events: list[pb.TranscribeEvent]) -> list[pb.Segment]:
    return [e.segment for e in events if e.WhichOneof("event") == "segment"]


def assert_same_segments(got: list[pb.Segment], expected: list[pb.Segment]) -> None:
    assert [s.text for s in got] == [s.text for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.start == pytest.approx(b.start, abs=TIME_NOISE) and a.end == pytest.approx(b.end, abs=TIME_NOISE)
        assert [w.word for w in a.words] == [w.word for w in b.words]
        for x, y in zip(a.words, b.words, strict=True):
            assert x.start == pytest.approx(y.start, abs=TIME_NOISE) and x.end == pytest.approx(y.end, abs=TIME_NOISE)


def run_in_threads(calls: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each call in its own thread, started together; its result or the exception it raised."""
    out: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        try:
            out[name] = call()
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            out[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not any(thread.is_alive() for thread in threads)
    return out


def sample(handle: InferenceHandle, name: str, **labels: str) -> float:
    return handle.app.metrics.registry.get_sample_value(name, {"model_id": MODEL, **labels}) or 0.0


def decoded(handle: InferenceHandle, op: str) -> float:
    """Items of this op decoded so far, both lanes."""
    return sum(sample(handle, "voxserve_decode_items_total", op=op, lane=lane) for lane in ("file", "latency"))


def batches_over_one(handle: InferenceHandle, op: str) -> float:
    """Batches of this op with more than one item, from the batch-size histogram."""
    count = sample(handle, "voxserve_decode_batch_size_count", op=op)
    return count - sample(handle, "voxserve_decode_batch_size_bucket", op=op, le="1.0")


def in_use(handle: InferenceHandle) -> int:
    models = handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models
    return next((m.in_use for m in models if m.model_id == MODEL), 0)


def record_opened_jobs(engine: WhisperEngine, monkeypatch: pytest.MonkeyPatch) -> list[BatchedJob]:
    """The scheduler handles the service opens on ``engine`` from now on, in order."""
    opened: list[BatchedJob] = []
    open_job = engine.open_job

    def recording(*args: Any, **kwargs: Any) -> BatchedJob:
        opened.append(open_job(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(engine, "open_job", recording)
    return opened


# --------------------------------------------------------------------------- the same results, shared batches


def test_concurrent_requests_get_the_segments_they_get_alone_in_shared_batches(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference(batch_size=8, batch_window_ms=LONGEST_WINDOW_MS)

    def call(name: str) -> Callable[[], list[pb.TranscribeEvent]]:
        audio, options = REQUESTS[name]
        return lambda: list(handle.stub.Transcribe(request(audio, **options), timeout=600))

    alone = {name: call(name)() for name in REQUESTS}
    assert batches_over_one(handle, "encode") == 0  # one at a time: every batch had one item
    windows = decoded(handle, "encode")  # one encode per window (and per first utterance)

    together = run_in_threads({name: call(name) for name in REQUESTS})
    for name in REQUESTS:
        assert not isinstance(together[name], Exception), together[name]
        assert together[name][-1].WhichOneof("event") == "completed"
        assert_same_segments(segments(together[name]), segments(alone[name]))
    assert batches_over_one(handle, "encode") + batches_over_one(handle, "generate") > 0
    assert decoded(handle, "encode") == 2 * windows  # the same windows
    assert sample(handle, "voxserve_decode_items_waiting") == 0
    wait_for(lambda: in_use(handle) == 0, timeout=30, message="every lease released")


def test_a_short_request_finishes_before_the_long_files_that_were_running(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference(batch_size=8, batch_window_ms=LONGEST_WINDOW_MS)
    long_audio = repeated_wav(MULTI, 6)  # 150 s: 5 windows each
    finished: list[str] = []
    first_segment = {name: threading.Event() for name in ("long-1", "long-2")}

    def call(name: str, audio: bytes) -> Callable[[], list[pb.TranscribeEvent]]:
        def run() -> list[pb.TranscribeEvent]:
            events = []
            for event in handle.stub.Transcribe(request(audio), timeout=600):
                events.append(event)
                if event.WhichOneof("event") == "segment" and name in first_segment:
                    first_segment[name].set()
            finished.append(name)
            return events

        return run

    def short_once_the_long_ones_run() -> list[pb.TranscribeEvent]:
        for event in first_segment.values():
            assert event.wait(300), "a long file sent no segment"
        return call("short", SHORT)()

    out = run_in_threads(
        {
            "long-1": call("long-1", long_audio),
            "long-2": call("long-2", long_audio),
            "short": short_once_the_long_ones_run,
        }
    )
    assert all(not isinstance(value, Exception) for value in out.values()), out
    assert finished[0] == "short", finished  # its window went into the next batches, not behind theirs
    assert "report" in " ".join(s.text for s in segments(out["short"])).lower()


def test_a_request_decodes_its_first_utterance_and_its_windows_as_one_scheduler_job(
    start_inference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One job from the first utterance (latency lane) to the last window (the file lane for a
    file longer than one window), so the scheduler's follow-up hold for a job's next call spans
    the step between them: a long file's window cannot start in that gap."""
    handle: InferenceHandle = start_inference()
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        opened = record_opened_jobs(lease.model, monkeypatch)
        for audio, lane in ((MULTI, Lane.LATENCY), (repeated_wav(MULTI, 3), Lane.FILE)):
            opened.clear()
            latency = sample(handle, "voxserve_decode_items_total", op="encode", lane="latency")
            events = list(handle.stub.Transcribe(request(audio), timeout=600))
            assert events[-1].WhichOneof("event") == "completed"
            assert len(opened) == 1 and opened[0].lane is lane and opened[0].closed
            assert opened[0].follow_up_seconds == REQUEST_FOLLOW_UP_SECONDS  # longer than a live stream's
            assert sample(handle, "voxserve_decode_items_total", op="encode", lane="latency") > latency


# --------------------------------------------------------------------------- cancel


def test_a_cancel_takes_waiting_decodes_off_the_queue_frees_the_lease_and_the_others_continue(
    start_inference: Any,
) -> None:
    handle: InferenceHandle = start_inference()
    # A handle that holds the scheduler: with an endless window it waits for every open job,
    # and this one never submits, so the jobs' first windows stay queued until it closes.
    handle.app.schedulers.set_settings(BatchSettings(batch_size=8, batch_window_ms=600_000.0))
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        scheduler = lease.model.scheduler
        # The requests fit one window (25 s): latency-bound, so a latency handle holds them.
        holder = lease.model.open_job("holder", Lane.LATENCY)
        outcome: dict[str, Any] = {}

        def run(job_id: str, audio: bytes) -> Callable[[], None]:
            def call() -> None:
                try:
                    outcome[job_id] = list(handle.stub.Transcribe(request(audio, job_id), timeout=600))
                except grpc.RpcError as error:
                    outcome[job_id] = error

            return call

        threads = [threading.Thread(target=run(job_id, MULTI)) for job_id in ("doomed", "kept")]
        for thread in threads:
            thread.start()
        wait_for(lambda: scheduler.waiting == 2, timeout=120, message="both jobs' first windows waiting")
        assert in_use(handle) == 3  # the holder's lease and both jobs'

        reply = handle.stub.CancelJob(pb.CancelJobRequest(job_id="doomed"))
        assert reply.state == pb.JOB_CANCELLED
        threads[0].join(60)
        assert outcome["doomed"].code() == grpc.StatusCode.CANCELLED
        assert scheduler.waiting == 1  # it left the queue without any batch running
        assert decoded(handle, "encode") == 0
        wait_for(lambda: in_use(handle) == 2, timeout=30, message="the cancelled job's lease freed")

        holder.close()
        threads[1].join(600)
    events = outcome["kept"]
    assert not isinstance(events, grpc.RpcError), events
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], " ".join(s.text for s in segments(events))) < 0.1
    wait_for(lambda: in_use(handle) == 0, timeout=30, message="every lease released")
    assert scheduler.waiting == 0


def test_a_passed_deadline_takes_waiting_decodes_off_the_queue(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference()
    handle.app.schedulers.set_settings(BatchSettings(batch_size=8, batch_window_ms=600_000.0))
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        scheduler = lease.model.scheduler
        holder = lease.model.open_job("holder", Lane.LATENCY)  # the job's (one) window waits while it is open
        with pytest.raises(grpc.RpcError) as caught:
            list(handle.stub.Transcribe(request(MULTI, "late"), timeout=5))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        job = handle.app.jobs.get("late")
        assert job.done_event.wait(60), "the job still runs after its deadline"
        assert job.state.value == "FAILED" and scheduler.waiting == 0  # it left while the holder held the queue
        assert decoded(handle, "encode") == 0
        holder.close()
    wait_for(lambda: in_use(handle) == 0, timeout=30, message="every lease released")


# --------------------------------------------------------------------------- live streams beside file jobs


def test_live_finals_and_drafts_keep_coming_while_file_jobs_run(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference(batch_size=8, batch_window_ms=10.0, live_abandon_lag_seconds=120.0)
    long_audio = repeated_wav(MULTI, 12)  # 300 s each: they run long after the stream's first finals
    file_started = threading.Event()
    seen: list[tuple[str, bool]] = []  # ("live", is_final) and ("file ended", False), in the order they came

    def file_job(job_id: str) -> Callable[[], None]:
        def run() -> None:
            try:
                for event in handle.stub.Transcribe(request(long_audio, job_id), timeout=600):
                    if event.WhichOneof("event") == "segment":
                        file_started.set()
            except grpc.RpcError as error:  # cancelled below once the stream is done
                assert error.code() == grpc.StatusCode.CANCELLED
            seen.append(("file ended", False))

        return run

    def live_stream() -> list[pb.StreamingTranscribeResponse]:
        assert file_started.wait(300), "the file jobs sent no segment"
        responses = []
        for response in handle.stub.StreamingTranscribe(
            live_requests(live_config(), pcm("speech_multi.wav"), 1.0), timeout=600
        ):
            responses.append(response)
            if response.WhichOneof("event") == "result":
                seen.append(("live", response.result.is_final))
        for job_id in ("file-1", "file-2"):
            handle.stub.CancelJob(pb.CancelJobRequest(job_id=job_id))
        return responses

    out = run_in_threads({"file-1": file_job("file-1"), "file-2": file_job("file-2"), "live": live_stream})
    assert all(not isinstance(value, Exception) for value in out.values()), out
    responses = out["live"]
    assert responses[-1].WhichOneof("event") == "completed"
    finals = [result for _, result in results(responses) if result.is_final]
    drafts = [result for _, result in results(responses) if not result.is_final]
    assert len(finals) >= 3 and drafts, "finals and drafts while the files ran"
    # Causality: the stream's drafts and finals came while the file jobs were still running.
    before_a_file_ended = seen[: seen.index(("file ended", False))]
    assert ("live", True) in before_a_file_ended and ("live", False) in before_a_file_ended, seen
    text = " ".join(result.text for result in finals)
    assert word_error_rate(TRANSCRIPTS["speech_multi.wav"], text) <= 0.1, text
    assert sample(handle, "voxserve_decode_items_total", op="encode", lane="latency") > 0


# --------------------------------------------------------------------------- settings


def test_two_decode_replicas_run_latency_work_beside_file_windows_with_the_same_results(
    start_inference: Any,
) -> None:
    """decode_replicas 2: the model loads with two CTranslate2 replicas and its scheduler runs a
    latency executor beside the file one; a short request (latency-bound: one window) and two
    longer ones at once still get what they get alone."""
    handle: InferenceHandle = start_inference(decode_replicas=2, batch_window_ms=LONGEST_WINDOW_MS)
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        assert lease.model.whisper_model.model.num_workers == 2
        assert lease.model.scheduler.lanes_apart
    calls = {
        "long": (repeated_wav(MULTI, 3), {"beam_size": 5}),
        "long-greedy": (repeated_wav(MULTI, 2), {"beam_size": 1}),
        "short": (SHORT, {"word_timestamps": True}),
    }

    def call(name: str) -> Callable[[], list[pb.TranscribeEvent]]:
        audio, options = calls[name]
        return lambda: list(handle.stub.Transcribe(request(audio, **options), timeout=600))

    def encodes() -> tuple[float, float]:
        """Encoder calls so far: (latency lane, file lane)."""
        latency = sample(handle, "voxserve_decode_items_total", op="encode", lane="latency")
        return latency, sample(handle, "voxserve_decode_items_total", op="encode", lane="file")

    alone = {}
    for name in calls:
        before = encodes()
        alone[name] = call(name)()
        latency, file = (after - then for after, then in zip(encodes(), before, strict=True))
        if name == "short":  # one window: latency-bound, none of its calls in the file lane
            assert latency >= 1 and file == 0
        else:  # its first utterance in the latency lane, its windows in the file lane
            assert latency >= 1 and file >= 2
    together = run_in_threads({name: call(name) for name in calls})
    for name in calls:
        assert not isinstance(together[name], Exception), together[name]
        assert_same_segments(segments(together[name]), segments(alone[name]))
    wait_for(lambda: in_use(handle) == 0, timeout=30, message="every lease released")


def test_a_reload_gives_every_scheduler_the_new_batch_settings(start_inference: Any) -> None:
    handle: InferenceHandle = start_inference(batch_size=8, batch_window_ms=10.0)
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        scheduler = lease.model.scheduler
        assert scheduler.settings == BatchSettings(batch_size=8, batch_window_ms=10.0, prompt_bucket_tokens=32)
        running = lease.model.open_job("running", Lane.FILE)
        new = replace(handle.app.config, batch_size=3, batch_window_ms=0.0, prompt_bucket_tokens=64)
        handle.app.apply_reloadable_settings(new)
        assert scheduler.settings == BatchSettings(batch_size=3, batch_window_ms=0.0, prompt_bucket_tokens=64)
        with lease.model.open_job("later", Lane.FILE) as later:
            assert later.prompt_bucket == 64
        assert running.prompt_bucket == 32  # a running job's prompts (and words) do not change
        running.close()
    assert handle.app.schedulers.settings.batch_size == 3  # and models loaded later get them
    assert {"batch_size", "batch_window_ms", "prompt_bucket_tokens"} <= handle.app.reloadable_settings


def test_a_job_with_its_own_prompt_text_keeps_its_prompts_whole(
    start_inference: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The previous-text prompts of a request or a live stream are cut to the service's bucket
    (32 tokens by default); one with an initial prompt or hotwords keeps them whole, so the
    caller's text is never cut."""
    handle: InferenceHandle = start_inference()
    cases: list[tuple[dict[str, str], int]] = [
        ({}, 32),
        ({"initial_prompt": "Weekly meeting."}, 0),
        ({"hotwords": "budget"}, 0),
    ]
    with handle.cache.acquire_as(MODEL, WhisperEngine) as lease:
        opened = record_opened_jobs(lease.model, monkeypatch)
        for options, bucket in cases:
            opened.clear()
            events = list(handle.stub.Transcribe(request(SHORT, **options), timeout=600))
            assert events[-1].WhichOneof("event") == "completed"
            assert [job.prompt_bucket for job in opened] == [bucket], options
        for options, bucket in cases:
            opened.clear()
            stream = live_requests(live_config(options=pb.TranscribeOptions(**options)), pcm("speech_short.wav"), 4.0)
            responses = list(handle.stub.StreamingTranscribe(stream, timeout=300))
            assert responses[-1].WhichOneof("event") == "completed"
            assert [job.prompt_bucket for job in opened] == [bucket], options


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("VOXSERVE_BATCH_SIZE", "0", "batch_size"),
        ("VOXSERVE_BATCH_WINDOW_MS", "-5", "batch_window_ms"),
        ("VOXSERVE_BATCH_WINDOW_MS", "nan", "batch_window_ms"),
        ("VOXSERVE_DECODE_REPLICAS", "0", "decode_replicas"),
        ("VOXSERVE_PROMPT_BUCKET_TOKENS", "-1", "prompt_bucket_tokens"),
        ("VOXSERVE_PROMPT_BUCKET_TOKENS", "224", "prompt_bucket_tokens"),
    ],
)
def test_bad_batch_settings_stop_the_service_with_exit_2_naming_the_key(
    tmp_path: Path, variable: str, value: str, key: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference_service", "--port", "0", "--metrics-port", "-1"],
        cwd=REPO_ROOT,
        env={**os.environ, variable: value, "VOXSERVE_CACHE_DIR": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
