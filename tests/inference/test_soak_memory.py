"""A soak on a real inference service process: its RSS stays flat under a steady load (issue 17).

200 Transcribe calls from 8 concurrent clients (the issue's 8 x 25), in 4 rounds of 50. The
upload is tests/data's short speech as a studio WAV (48 kHz stereo, 32-bit: 1.2 MB for 3.2 s):
decoding it costs what 3.2 s costs, and a service that kept each ended job's upload grows by
~120 MiB over the second 100 calls, ~25 % of its RSS.

The RSS is read once a round has ended and the service, idle, has handed the heap the jobs
freed back to the OS (its "freed heap returned" log line): without that, glibc kept ~120 MiB
of freed heap after each round, whose high-water mark crept up as the arenas of more threads
reached theirs, +0.7 % to +4.1 % over the second half on the loaded 2-core VM with nothing
held by the service. Under the retention's byte limit, a service that kept the uploads would
stay flat by evicting jobs instead: the first call's job must still be there for WatchJob.
Figures: docs/performance.md, "Memory over a soak".
"""

from __future__ import annotations

import io
import statistics
import time
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceProcess, StoreHandle, normalise, transcribe, wait_for
from voxserve.inference.v1 import inference_pb2 as ipb

CLIENTS = 8
ROUNDS = 4
CALLS_PER_ROUND = 50
MAX_GROWTH = 0.05  # the bound, over the second half: RSS after 100 calls -> after 200
MiB = 1 << 20

# 6-9 minutes measured with CI and other work on the 2 cores: the suite's 300 s default is too short.
pytestmark = pytest.mark.timeout(900)


def studio_wav(source: bytes, rate: int = 48_000, channels: int = 2) -> bytes:
    """``source`` (16-bit mono) resampled to ``rate`` and written as ``channels`` x 32-bit PCM."""
    with wave.open(io.BytesIO(source)) as reader:
        samples = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2").astype(np.float64)
        source_rate = reader.getframerate()
    times = np.arange(round(len(samples) * rate / source_rate)) / rate
    upsampled = np.interp(times, np.arange(len(samples)) / source_rate, samples) * 65536
    frames = np.repeat(upsampled.astype("<i4")[:, None], channels, axis=1)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(4)
        writer.setframerate(rate)
        writer.writeframes(frames.tobytes())
    return out.getvalue()


def idle_rss(process: psutil.Process, samples: int = 5) -> int:
    """The median of a few RSS readings a fifth of a second apart, once the calls have ended."""
    readings = []
    for _ in range(samples):
        time.sleep(0.2)
        readings.append(process.memory_info().rss)
    return int(statistics.median(readings))


def heap_releases(inference: InferenceProcess) -> list[dict[str, Any]]:
    return [r for r in inference.records() if r.get("message") == "freed heap returned"]


def test_rss_is_flat_over_the_second_half_of_200_calls(start_store: Callable[..., StoreHandle], tmp_path: Path) -> None:
    store = start_store(import_embedded=True)
    audio = studio_wav((DATA_DIR / "speech_short.wav").read_bytes())
    assert len(audio) > 1_000_000  # 100 kept uploads would be ~25 % of the service's RSS
    expected = normalise(TRANSCRIPTS["speech_short.wav"])
    inference = InferenceProcess(tmp_path, store.address)
    try:
        inference.wait_status(health_pb2.HealthCheckResponse.SERVING, "voxserve.inference.v1.Inference", timeout=120)
        process = psutil.Process(inference.process.pid)

        def call(_: int) -> tuple[str, str]:
            events = transcribe(inference, audio, timeout=300)
            return events[0].job_id, events[-1].completed.text

        rss: list[int] = []  # once a round's calls have ended and the idle service returned the freed heap
        before_release: list[int] = []  # what the service read just before returning it
        job_ids: list[str] = []
        with ThreadPoolExecutor(CLIENTS) as clients:
            for _ in range(ROUNDS):
                released = len(heap_releases(inference))
                results = list(clients.map(call, range(CALLS_PER_ROUND)))
                assert [normalise(text) for _, text in results] == [expected] * CALLS_PER_ROUND
                job_ids += [job_id for job_id, _ in results]
                # No job is idle for long within a round: the release that comes is the round's end.
                wait_for(
                    lambda seen=released: len(heap_releases(inference)) > seen,
                    timeout=120,
                    interval=0.5,
                    message="freed heap returned",
                )
                before_release.append(heap_releases(inference)[-1]["rss_before_bytes"])
                rss.append(idle_rss(process))
        figures = ", ".join(
            f"{(i + 1) * CALLS_PER_ROUND}: {after / MiB:.0f} MiB ({before / MiB:.0f} before the release)"
            for i, (after, before) in enumerate(zip(rss, before_release, strict=True))
        )
        print(f"inference RSS after {figures}")
        half = rss[ROUNDS // 2 - 1]
        growth = (rss[-1] - half) / half
        assert growth < MAX_GROWTH, f"RSS grew {growth:+.1%} over the second half ({figures})"

        # Flat because the ended jobs let go of their audio, not because they were dropped:
        # the first call's job is still kept, and WatchJob replays it to its transcript.
        assert len(set(job_ids)) == ROUNDS * CALLS_PER_ROUND
        replay = list(inference.stub.WatchJob(ipb.WatchJobRequest(job_id=job_ids[0]), timeout=60))
        assert replay[-1].WhichOneof("event") == "completed"
        assert normalise(replay[-1].completed.text) == expected
    finally:
        inference.close()
