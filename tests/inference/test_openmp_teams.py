"""A Whisper model loaded from a thread that outlives the load (an RPC's or a job's pool thread)
leaves no OpenMP team behind: CTranslate2 runs a load's parallel loops on the calling thread's own
libgomp team, and while that team lives libgomp counts more threads than cores and makes every
team in the process sleep between parallel regions (docs/performance.md, "OpenMP teams left by a
load"). The sleeps are voluntary context switches: thousands per decode when throttled, a few
dozen when not. Each case runs in a fresh interpreter (the state is process-wide and stays)."""

from __future__ import annotations

from typing import Any

from tests.support import run_probe

PROBE = """
import json, os, resource, sys
from concurrent.futures import ThreadPoolExecutor
from faster_whisper import WhisperModel
from inference_service.engines.device import DeviceChoice
from inference_service.engines.whisper import WhisperEngine
from tests.support import DATA_DIR, TINY_EN_DIR

cores = len(os.sched_getaffinity(0))  # a team as wide as the CPU, the service's default on 2 cores
pool = ThreadPoolExecutor(1)  # lives on after the load, as asyncio.to_thread's threads do
if sys.argv[1] == "engine":
    load = lambda: WhisperEngine.load("tiny", TINY_EN_DIR, DeviceChoice("cpu", "int8"), cpu_threads=cores).whisper_model
else:
    load = lambda: WhisperModel(str(TINY_EN_DIR), device="cpu", compute_type="int8", cpu_threads=cores)
model = pool.submit(load).result()
before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
segments, _ = model.transcribe(str(DATA_DIR / "speech_short.wav"), beam_size=5)
text = " ".join(segment.text.strip() for segment in segments)
switches = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
print(json.dumps({"cores": cores, "switches": switches, "text": text}))
"""


def probe(how: str) -> dict[str, Any]:
    return run_probe(PROBE, how, drop_env=lambda key: key.startswith(("OMP_", "GOMP_")))


def test_a_load_from_a_pool_thread_leaves_the_decoder_team_spinning() -> None:
    engine = probe("engine")
    direct = probe("direct")
    # The same words either way: only the waiting changes.
    assert engine["text"] == direct["text"] == "Please send the report to my office today."
    if direct["cores"] >= 2:
        # The probe sees the throttling: faster-whisper loaded on the pool thread itself (3500
        # switches for this 3 s clip on 2 cores, against about 20 through the engine).
        assert direct["switches"] > 10 * max(engine["switches"], 50), (engine, direct)
    assert engine["switches"] < 1000, engine


def test_a_failed_load_raises_in_the_caller() -> None:
    from inference_service.engines.device import on_passing_thread

    def fail() -> None:
        raise ValueError("no such file")

    try:
        on_passing_thread(fail, name="probe")
    except ValueError as exc:
        assert str(exc) == "no such file"
    else:
        raise AssertionError("the error did not reach the caller")


def test_the_caller_context_reaches_the_passing_thread() -> None:
    import contextvars
    import threading

    from inference_service.engines.device import on_passing_thread

    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
    request_id.set("req-7")
    seen = on_passing_thread(lambda: (request_id.get(), threading.current_thread().name), name="probe")
    assert seen == ("req-7", "probe")
    assert threading.current_thread().name != "probe"
