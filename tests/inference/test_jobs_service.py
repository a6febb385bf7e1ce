"""Streaming semantics: cancel frees the lease, WatchJob resumes exactly once, admission."""

from __future__ import annotations

import io
import threading
import wave

import grpc
import pytest

from tests.support import DATA_DIR, InferenceHandle, wait_for
from voxserve.inference.v1 import inference_pb2 as pb

MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()
SHORT = (DATA_DIR / "speech_short.wav").read_bytes()


def repeated_wav(times: int) -> bytes:
    """speech_multi.wav played ``times`` times in one WAV (about 25 s each)."""
    with wave.open(io.BytesIO(MULTI)) as source:
        params = source.getparams()
        frames = source.readframes(source.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as target:
        target.setparams(params)
        target.writeframes(frames * times)
    return out.getvalue()


LONG = repeated_wav(4)


def in_use(handle: InferenceHandle, model_id: str = "whisper-tiny.en") -> int:
    for model in handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models:
        if model.model_id == model_id:
            return model.in_use
    return 0


def test_client_cancel_stops_the_job_and_frees_the_lease(inference: InferenceHandle) -> None:
    call = inference.stub.Transcribe(pb.TranscribeRequest(audio=LONG), timeout=120)
    job_id = ""
    for event in call:
        job_id = event.job_id
        if event.WhichOneof("event") == "segment":
            break
    assert in_use(inference) == 1
    call.cancel()
    job = inference.app.jobs.get(job_id)
    assert job.done_event.wait(10), "job still running after the client cancelled"
    assert job.state.value == "CANCELLED"
    wait_for(lambda: in_use(inference) == 0, timeout=5, message="lease released")
    segments = [e for e in job.events_after(0) if type(e.payload).__name__ == "Segment"]
    assert len(segments) < 12  # it stopped well before the end of the doubled audio


def test_cancel_job_rpc_stops_a_running_job(inference: InferenceHandle) -> None:
    results: dict = {}

    def run() -> None:
        try:
            for event in inference.stub.Transcribe(pb.TranscribeRequest(audio=LONG, job_id="cancel-me"), timeout=120):
                results.setdefault("events", []).append(event)
        except grpc.RpcError as error:
            results["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: any(e.WhichOneof("event") == "segment" for e in results.get("events", [])), timeout=60)
    response = inference.stub.CancelJob(pb.CancelJobRequest(job_id="cancel-me"))
    assert response.state == pb.JOB_CANCELLED
    thread.join(10)
    assert results["error"].code() == grpc.StatusCode.CANCELLED
    assert in_use(inference) == 0


def test_watch_job_after_disconnect_yields_every_segment_once(inference: InferenceHandle) -> None:
    call = inference.stub.Transcribe(pb.TranscribeRequest(audio=MULTI, job_id="resume-1"), timeout=120)
    seen: list[pb.TranscribeEvent] = []
    for event in call:
        seen.append(event)
        if event.WhichOneof("event") == "segment":
            break
    call.cancel()  # the connection is "lost"; the job has a client job_id so it keeps running
    last = seen[-1].sequence
    rest = list(inference.stub.WatchJob(pb.WatchJobRequest(job_id="resume-1", after_sequence=last), timeout=120))
    combined = seen + rest
    assert [e.sequence for e in combined] == list(range(1, len(combined) + 1))
    assert combined[-1].WhichOneof("event") == "completed"
    indexes = [e.segment.index for e in combined if e.WhichOneof("event") == "segment"]
    assert indexes == list(range(len(indexes))) and len(indexes) >= 3
    # A second watcher from 0 gets the identical history.
    replay = list(inference.stub.WatchJob(pb.WatchJobRequest(job_id="resume-1"), timeout=30))
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in combined]


def test_retry_with_same_job_id_attaches_and_different_audio_is_rejected(inference: InferenceHandle) -> None:
    first = list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT, job_id="idem-1"), timeout=120))
    stats = inference.app.cache.stats()
    again = list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT, job_id="idem-1"), timeout=120))
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in first]
    after = inference.app.cache.stats()  # the retry attached to the job: nothing acquired again
    assert (after.loads, after.hits, after.misses) == (stats.loads, stats.hits, stats.misses)
    with pytest.raises(grpc.RpcError) as info:
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=MULTI, job_id="idem-1"), timeout=30))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_watch_unknown_job_is_not_found(inference: InferenceHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(inference.stub.WatchJob(pb.WatchJobRequest(job_id="nope"), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_admission_control_rejects_beyond_running_and_queued(start_inference) -> None:
    handle = start_inference(max_running_jobs=1, max_queued_jobs=1)
    calls = []
    first_events = []
    for i in range(2):
        calls.append(handle.stub.Transcribe(pb.TranscribeRequest(audio=MULTI, job_id=f"adm-{i}"), timeout=120))
        first_events.append(next(calls[-1]))
    assert first_events[0].accepted.queue_position == 0
    assert first_events[1].accepted.queue_position == 1
    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 running and 1 queued" in info.value.details()
    for call in calls:
        assert list(call)[-1].WhichOneof("event") == "completed"


def test_audio_over_the_limit_is_resource_exhausted(start_inference) -> None:
    handle = start_inference(max_audio_bytes=10_000)
    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "10000" in info.value.details().replace(",", "")


def test_transcribe_stream_in_chunks(inference: InferenceHandle) -> None:
    def chunks():
        yield pb.TranscribeChunk(options=pb.TranscribeOptions(word_timestamps=True), audio=SHORT[:20000])
        for offset in range(20000, len(SHORT), 20000):
            yield pb.TranscribeChunk(audio=SHORT[offset : offset + 20000])

    events = list(inference.stub.TranscribeStream(chunks(), timeout=120))
    text = " ".join(e.segment.text for e in events if e.WhichOneof("event") == "segment").lower()
    assert "report" in text and "office" in text
    with pytest.raises(grpc.RpcError) as info:
        list(inference.stub.TranscribeStream(iter([pb.TranscribeChunk(audio=SHORT)]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_is_honoured(inference: InferenceHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=LONG), timeout=1.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    jobs = inference.app.jobs.jobs()
    assert jobs and all(job.done_event.wait(10) for job in jobs)  # the work stopped, not just the call
    assert all(job.state.value in ("FAILED", "CANCELLED") for job in jobs)


def test_watch_job_types_filter_gets_every_event_of_those_types_in_order(inference: InferenceHandle) -> None:
    everything = list(inference.stub.Transcribe(pb.TranscribeRequest(audio=MULTI, job_id="typed-1"), timeout=180))
    segments_only = list(
        inference.stub.WatchJob(
            pb.WatchJobRequest(job_id="typed-1", types=[pb.JOB_EVENT_SEGMENT, pb.JOB_EVENT_COMPLETED]), timeout=60
        )
    )
    expected = [e for e in everything if e.WhichOneof("event") in ("segment", "completed")]
    assert len(expected) >= 3 and len(expected) < len(everything)  # something was filtered out
    assert [e.SerializeToString() for e in segments_only] == [e.SerializeToString() for e in expected]
    # Resuming after a filtered stream's last sequence misses nothing of those types.
    middle = expected[0].sequence
    rest = list(
        inference.stub.WatchJob(
            pb.WatchJobRequest(job_id="typed-1", after_sequence=middle, types=[pb.JOB_EVENT_SEGMENT]), timeout=60
        )
    )
    assert [e.sequence for e in rest] == [e.sequence for e in expected[1:] if e.WhichOneof("event") == "segment"]
    with pytest.raises(grpc.RpcError) as caught:
        list(inference.stub.WatchJob(pb.WatchJobRequest(job_id="typed-1", types=[42]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "JOB_EVENT_SEGMENT" in caught.value.details()
