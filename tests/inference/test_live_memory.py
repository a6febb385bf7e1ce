"""Live streams' memory in the model cache's budget: the measured VAD footprint, reservations
that evict idle models (or fail with CacheFull) on a real cache of real tiny.en models, and
the accounting of a real stream on a real server."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import grpc
import pytest

from inference_service.audio import decode_audio
from inference_service.engines.device import DeviceChoice
from inference_service.engines.loaders import make_loader
from inference_service.engines.speech_detector import SpeechDetector, VadSessions
from inference_service.engines.vad import find_onnx_model, packaged_silero_model_dir
from inference_service.errors import CacheFull
from inference_service.live.memory import VAD_SESSION_BYTES, VAD_STATE_BYTES, stream_bytes
from inference_service.live.session import LiveSettings
from inference_service.memory import MemoryProbe
from inference_service.model_cache import CacheConfig, ModelCache, ModelSpec, ProgressCallback
from tests.support import DATA_DIR, TINY_EN_DIR, InferenceHandle, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.errors import InvalidArgument

MiB = 1 << 20
TINY_SIZE = sum(f.stat().st_size for f in TINY_EN_DIR.iterdir() if f.is_file())
SPEECH = decode_audio((DATA_DIR / "speech_short.wav").read_bytes())


def rss(probe: MemoryProbe) -> int:
    gc.collect()
    probe.return_freed_memory("cpu")
    return probe.process_rss_bytes()


def test_the_reserved_sizes_bound_the_measured_vad_footprint() -> None:
    probe = MemoryProbe()
    path = find_onnx_model(packaged_silero_model_dir())
    warm = VadSessions()
    SpeechDetector(warm.session(path)).probabilities(SPEECH[:16000])  # onnxruntime itself is loaded now
    count = 4
    before = rss(probe)
    sessions = [VadSessions() for _ in range(count)]
    for own in sessions:
        SpeechDetector(own.session(path)).probabilities(SPEECH[:16000])
    per_session = (rss(probe) - before) / count
    assert 1 * MiB < per_session <= VAD_SESSION_BYTES * 1.3, f"{per_session / MiB:.1f} MiB per session"

    shared = warm.session(path)
    detectors = 400
    before = rss(probe)
    streams = [SpeechDetector(shared) for _ in range(detectors)]
    for detector in streams:
        detector.probabilities(SPEECH[:15900])  # a remainder stays pending, as in a stream
    per_stream = (rss(probe) - before) / detectors
    assert per_stream <= VAD_STATE_BYTES, f"{per_stream / 1024:.1f} KiB per stream"
    assert len(streams) == detectors


def test_a_stream_reservation_covers_its_vad_state_and_buffers() -> None:
    settings = LiveSettings()
    nbytes = stream_bytes(settings, abandon_lag=20.0)
    # 20 s buffer + 20 s of lag + one 30 s decode copy of float32 16 kHz audio, plus the VAD state.
    assert nbytes == VAD_STATE_BYTES + 70 * 16000 * 4


@pytest.fixture
def cache_with_budget() -> Iterator[ModelCache]:
    """A cache of real tiny.en engines ('whisper-*' ids) with room for one model and a bit."""

    def resolve(model_id: str, on_progress: ProgressCallback | None) -> ModelSpec:
        return ModelSpec(model_id, "whisper", TINY_EN_DIR, TINY_SIZE)

    load = make_loader(DeviceChoice("cpu", "int8"), cpu_threads=1)
    cache = ModelCache(CacheConfig(max_models=4, memory_budget_bytes=96 * MiB), resolve, load)
    yield cache
    cache.close()


def loaded(cache: ModelCache) -> list[str]:
    return [m.model_id for m in cache.loaded()]


def test_a_reservation_evicts_an_idle_model_and_counts_as_used(cache_with_budget: ModelCache) -> None:
    cache = cache_with_budget
    model = cache.load_model("whisper-a").memory_bytes
    assert loaded(cache) == ["whisper-a"] and cache.stats().memory_used_bytes == model
    small = cache.reserve(MiB, "a small stream")
    assert loaded(cache) == ["whisper-a"], "a reservation that fits evicts nothing"
    assert cache.stats().memory_used_bytes == model + MiB
    big_bytes = cache.memory_budget_bytes - model  # with the small one, models + reservations overflow
    with cache.reserve(big_bytes, "a big stream"):
        assert loaded(cache) == [], "the idle model was evicted to make room"
        stats = cache.stats()
        assert stats.memory_used_bytes == MiB + big_bytes <= stats.memory_budget_bytes
        assert stats.evictions_by_reason["memory_budget"] == 1
    assert cache.stats().memory_used_bytes == MiB
    small.release()
    small.release()  # harmless
    assert cache.stats().memory_used_bytes == 0


def test_a_reservation_that_cannot_fit_is_cache_full_and_holds_nothing(cache_with_budget: ModelCache) -> None:
    cache = cache_with_budget
    with cache.acquire("whisper-a") as lease:
        model = cache.stats().memory_used_bytes
        with pytest.raises(CacheFull, match="cannot hold live stream x") as info:
            cache.reserve(cache.memory_budget_bytes - model + MiB, "live stream x")
        assert "whisper-a" in str(info.value) and "in use" in str(info.value)
        assert cache.stats().memory_used_bytes == model and loaded(cache) == ["whisper-a"]
        assert lease.model is not None
    with pytest.raises(InvalidArgument, match="negative"):
        cache.reserve(-1, "nothing")


def test_a_load_makes_room_for_the_reservations_too(cache_with_budget: ModelCache) -> None:
    cache = cache_with_budget
    cache.load_model("whisper-a")
    # whisper-b has never been loaded: its estimate is its size on disk times the whisper
    # factor. (whisper-a's measured RSS delta varies with the process's history, so the
    # reservation is sized from the estimate the load decides on, not from whisper-a.)
    estimate = cache.estimate_bytes(ModelSpec("whisper-b", "whisper", TINY_EN_DIR, TINY_SIZE))
    with cache.reserve(cache.memory_budget_bytes - estimate + MiB, "streams"):
        with pytest.raises(CacheFull, match="whisper-b"):
            cache.load_model("whisper-b")  # evicting whisper-a is not enough: the streams hold the room
        assert cache.stats().memory_used_bytes <= cache.memory_budget_bytes
    info = cache.load_model("whisper-b")
    assert info.model_id == "whisper-b"
    assert cache.stats().memory_used_bytes <= cache.memory_budget_bytes


def _loaded_model_bytes(handle: InferenceHandle) -> int:
    models = handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models
    return sum(m.memory_bytes for m in models)


def test_a_live_stream_counts_in_memory_used_while_it_lasts(inference: InferenceHandle) -> None:
    assert inference.app.live is not None
    limits = inference.app.live.limits
    per_stream = stream_bytes(LiveSettings(), limits.abandon_lag)
    pcm = (SPEECH.clip(-1, 1) * 32767).astype("<i2").tobytes()
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000, interim_results=True)
    go_on = threading.Event()

    def requests() -> Iterator[pb.StreamingTranscribeRequest]:
        yield pb.StreamingTranscribeRequest(config=config)
        yield pb.StreamingTranscribeRequest(audio=pcm[: len(pcm) // 4])
        go_on.wait(120)
        yield pb.StreamingTranscribeRequest(audio=pcm[len(pcm) // 4 :])

    responses: list[pb.StreamingTranscribeResponse] = []
    call = inference.stub.StreamingTranscribe(requests(), timeout=300)
    reader = threading.Thread(target=lambda: responses.extend(call), daemon=True)
    reader.start()
    try:
        wait_for(lambda: responses and responses[0].WhichOneof("event") == "accepted", timeout=120)

        def during() -> int:
            return int(inference.stub.GetCacheStats(pb.GetCacheStatsRequest()).memory_used_bytes)

        # The VAD session is made (and reserved) just before the stream starts.
        wait_for(lambda: during() == _loaded_model_bytes(inference) + per_stream + VAD_SESSION_BYTES, timeout=60)
    finally:
        go_on.set()
    reader.join(120)
    assert responses[-1].WhichOneof("event") == "completed"
    # The stream's reservation ends with it; the shared VAD session is kept for the next one.
    wait_for(
        lambda: (
            inference.stub.GetCacheStats(pb.GetCacheStatsRequest()).memory_used_bytes
            == _loaded_model_bytes(inference) + VAD_SESSION_BYTES
        ),
        timeout=60,
    )


def test_a_live_stream_without_room_is_resource_exhausted(inference: InferenceHandle) -> None:
    inference.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"))
    inference.stub.LoadModel(pb.LoadModelRequest(model_id="silero-vad"))
    used = inference.stub.GetCacheStats(pb.GetCacheStatsRequest()).memory_used_bytes
    per_stream = stream_bytes(LiveSettings(), 20.0)
    # Room for the VAD session and half a stream; the models are leased by the stream itself.
    budget = used + VAD_SESSION_BYTES + per_stream // 2
    inference.stub.SetCacheLimits(pb.SetCacheLimitsRequest(memory_budget=str(budget)))
    pcm = (SPEECH.clip(-1, 1) * 32767).astype("<i2").tobytes()
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000)
    requests = iter([pb.StreamingTranscribeRequest(config=config), pb.StreamingTranscribeRequest(audio=pcm)])
    with pytest.raises(grpc.RpcError) as info:
        list(inference.stub.StreamingTranscribe(requests, timeout=120))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert "cannot hold live stream" in details and "memory budget" in details, details
    stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest())
    # The shared VAD session was made and stays (for the next stream); the refused stream holds nothing.
    assert stats.memory_used_bytes == used + VAD_SESSION_BYTES, "the refused stream left a reservation behind"
    assert {m.model_id for m in inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models} >= {
        "whisper-tiny.en",
        "silero-vad",
    }


def test_new_limits_count_the_reservations_too(cache_with_budget: ModelCache) -> None:
    cache = cache_with_budget
    model = cache.load_model("whisper-a").memory_bytes
    with cache.reserve(8 * MiB, "streams"):
        change = cache.set_limits(memory_budget=str(model + 4 * MiB))  # the model alone would fit
        assert change.evicted == ("whisper-a",)
        assert cache.stats().memory_used_bytes == 8 * MiB
