"""JobManager (issue 17): an ended job drops its audio and stays watchable within the retention
limits (count, bytes, time); a job cancelled while queued frees its place at once; the freed heap
is handed back once the jobs have ended and the manager stayed idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from inference_service.engines.whisper import TranscribeOptions
from inference_service.job_retention import RetentionLimits
from inference_service.jobs import Job, JobLimits, JobManager, JobRequest, JobState
from inference_service.metrics import InferenceMetrics
from inference_service.payloads import Completed
from tests.support import wait_for
from voxserve_common.errors import NotFound, ResourceExhausted

AUDIO = b"\x01" * 100_000


def request(job_id: str = "") -> JobRequest:
    return JobRequest("whisper-tiny.en", AUDIO, TranscribeOptions(), job_id=job_id)


def completes(job: Job) -> None:
    job.emit(Completed(1.0, 0.1, 0.1, 0.0, True, 1, "done"))


def sample(metrics: InferenceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture
def make_manager() -> Iterator[Callable[..., JobManager]]:
    made: list[JobManager] = []

    def make(
        run: Callable[..., None] = completes, retention: RetentionLimits | None = None, **options: object
    ) -> JobManager:
        limits = JobLimits(max_running=1, max_queued=1, retention=retention or RetentionLimits())
        manager = JobManager(limits, run, **options)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def ended(manager: JobManager, job_id: str = "") -> None:
    job, _ = manager.submit(request(job_id))
    assert job.done_event.wait(30)
    assert job.state == JobState.COMPLETED


def test_an_ended_job_keeps_its_events_not_its_audio(make_manager: Callable[..., JobManager]) -> None:
    manager = make_manager()
    job, _ = manager.submit(request("kept"))
    assert job.done_event.wait(30)
    kept = manager.get("kept")
    assert kept.request.audio == b""
    assert kept.held_bytes() < 10_000
    assert [type(event.payload).__name__ for event in kept.events_after(0) or []] == ["Accepted", "Completed"]


def test_retention_evicts_the_oldest_by_count_bytes_and_time(make_manager: Callable[..., JobManager]) -> None:
    metrics = InferenceMetrics()
    manager = make_manager(retention=RetentionLimits(seconds=600, max_jobs=2, max_bytes=1 << 20), metrics=metrics)
    for name in ("a", "b", "c"):
        ended(manager, name)
    # done_event is set as the job ends, a moment before it moves to the kept jobs.
    wait_for(lambda: [job.job_id for job in manager.jobs()] == ["b", "c"], message="a evicted, b and c kept")
    with pytest.raises(NotFound):
        manager.get("a")
    assert sample(metrics, "voxserve_jobs_evicted_total", reason="count_limit") == 1
    assert sample(metrics, "voxserve_jobs_retained") == 2

    one_job = manager.get("c").held_bytes()
    manager.set_retention(RetentionLimits(seconds=600, max_jobs=2, max_bytes=one_job))
    assert [job.job_id for job in manager.jobs()] == ["c"]
    assert sample(metrics, "voxserve_jobs_evicted_total", reason="bytes_limit") == 1
    assert sample(metrics, "voxserve_jobs_retained_bytes") == one_job

    manager.set_retention(RetentionLimits(seconds=0.5, max_jobs=2, max_bytes=1 << 20))
    wait_for(lambda: not manager.jobs(), timeout=30, message="the timer's sweep evicts the expired job")
    assert sample(metrics, "voxserve_jobs_evicted_total", reason="expired") == 1


def test_a_job_cancelled_while_queued_frees_its_place_at_once(make_manager: Callable[..., JobManager]) -> None:
    release = threading.Event()
    manager = make_manager(run=lambda job: release.wait(30))
    running, _ = manager.submit(request())
    queued, _ = manager.submit(request())
    with pytest.raises(ResourceExhausted):
        manager.submit(request())  # one running, one queued: full
    queued.cancel()
    assert queued.done_event.is_set() and queued.state == JobState.CANCELLED
    assert queued.request.audio == b""
    third, _ = manager.submit(request())  # its place is free while the first still runs
    assert running.state == JobState.RUNNING
    release.set()
    assert third.done_event.wait(30) and third.state == JobState.COMPLETED


def test_the_freed_heap_is_returned_once_per_quiet_spell(make_manager: Callable[..., JobManager]) -> None:
    calls: list[int] = []
    release = threading.Event()
    manager = make_manager(run=lambda job: release.wait(30), on_idle=lambda: calls.append(len(manager.jobs())))
    job, _ = manager.submit(request())
    time.sleep(3.5)  # the job runs through several sweeps: nothing is released under it
    assert calls == []
    release.set()
    assert job.done_event.wait(30)
    wait_for(lambda: calls, timeout=30, message="on_idle once the manager was idle")
    time.sleep(3.5)  # more sweeps, still idle
    assert calls == [1], "once per quiet spell, not at every sweep"
    ended(manager)  # a new spell of work: released again after it
    wait_for(lambda: len(calls) == 2, timeout=30, message="on_idle after the next job")
