"""Changing the cache's limits at run time: ModelCache.set_limits with real tiny.en loads, and
SetCacheLimits on a real inference service (evictions, stats, gauges, INVALID_ARGUMENT)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
import yaml

from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import CacheConfig, CacheFull, ModelCache
from tests.inference.test_model_cache import WHISPER_ESTIMATE, Loader, Resolver, hold_in_thread, ids
from tests.support import InferenceHandle, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.errors import InvalidArgument

GiB = 1 << 30


@pytest.fixture
def make_cache() -> Iterator[Callable[..., tuple[ModelCache, Loader]]]:
    caches: list[ModelCache] = []

    def make(metrics: InferenceMetrics | None = None, **config: object) -> tuple[ModelCache, Loader]:
        loader = Loader()
        cache = ModelCache(CacheConfig(**config), Resolver(), loader, metrics=metrics)  # type: ignore[arg-type]
        caches.append(cache)
        return cache, loader

    yield make
    for cache in caches:
        cache.close()


def gauge(metrics: InferenceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_lowering_max_models_evicts_idle_models_least_recently_used_first(make_cache, caplog) -> None:
    metrics = InferenceMetrics()
    cache, loader = make_cache(metrics, max_models=4, pinned=("whisper-pinned",))
    for model_id in ("whisper-pinned", "whisper-old", "whisper-mid", "whisper-new"):
        cache.acquire(model_id).release()
    assert gauge(metrics, "voxserve_loaded_models") == 4

    with caplog.at_level(logging.INFO, logger="inference_service.model_cache"):
        change = cache.set_limits(max_models=2)
    assert change.evicted == ("whisper-old", "whisper-mid")
    assert change.held_over == () and not change.over_limits
    assert ids(cache) == ["whisper-pinned", "whisper-new"]
    assert change.stats.max_models == 2 and change.stats.loaded_models == 2
    assert change.stats.evictions_by_reason["count_limit"] == 2
    assert all(m.closed for mid in ("whisper-old", "whisper-mid") for m in loader.models[mid])
    assert gauge(metrics, "voxserve_loaded_models") == 2
    assert gauge(metrics, "voxserve_cache_evictions_total", model_id="whisper-old", reason="count_limit") == 1
    record = next(r for r in caplog.records if r.getMessage() == "model cache limits changed")
    assert record.max_models == 2 and record.previous_max_models == 4  # type: ignore[attr-defined]
    assert record.evicted == ["whisper-old", "whisper-mid"]  # type: ignore[attr-defined]

    # The new limit holds for loads from now on: a third model evicts the LRU idle one.
    cache.acquire("whisper-third").release()
    assert ids(cache) == ["whisper-pinned", "whisper-third"]


def test_models_in_use_or_pinned_are_kept_over_the_new_limits_until_released(make_cache, caplog) -> None:
    cache, _ = make_cache(max_models=3, pinned=("whisper-pinned",))
    cache.acquire("whisper-pinned").release()
    cache.acquire("whisper-idle").release()
    done, holder = hold_in_thread(cache, "whisper-busy")
    try:
        with caplog.at_level(logging.WARNING, logger="inference_service.model_cache"):
            change = cache.set_limits(max_models=1)
        assert change.evicted == ("whisper-idle",)
        assert change.over_limits and set(change.held_over) == {"whisper-pinned", "whisper-busy"}
        assert change.stats.max_models == 1 and change.stats.loaded_models == 2
        warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
        assert "over its new limits" in warning.getMessage()
        assert sorted(warning.held) == ["whisper-busy (in use by 1)", "whisper-pinned (pinned)"]  # type: ignore[attr-defined]
        # Over the limit: a new model cannot load while the two are held.
        with pytest.raises(CacheFull):
            cache.acquire("whisper-other")
        assert ids(cache) == ["whisper-pinned", "whisper-busy"]
    finally:
        done.set()
        holder.join()
    # The last lease of the busy model ended while the cache is over: it leaves; the pinned one stays.
    assert ids(cache) == ["whisper-pinned"]
    assert cache.stats().evictions_by_reason["count_limit"] == 2


def test_lowering_the_memory_budget_evicts_until_it_holds_and_raising_it_makes_room(make_cache) -> None:
    metrics = InferenceMetrics()
    cache, _ = make_cache(metrics, max_models=5, memory_budget_bytes=4 * GiB)
    for model_id in ("whisper-a", "whisper-b", "whisper-c"):
        cache.acquire(model_id).release()
    sizes = {info.model_id: info.memory_bytes for info in cache.loaded()}
    room_for_one = sizes["whisper-c"]  # exactly: a and b (each > 0 bytes) must both leave

    change = cache.set_limits(memory_budget=str(room_for_one))
    assert change.evicted == ("whisper-a", "whisper-b")
    assert ids(cache) == ["whisper-c"]
    assert change.stats.memory_budget_bytes == room_for_one == cache.memory_budget_bytes
    assert change.stats.evictions_by_reason["memory_budget"] == 2
    assert gauge(metrics, "voxserve_memory_budget_bytes", device="cpu") == room_for_one
    assert change.stats.max_models == 5  # unchanged

    change = cache.set_limits(memory_budget="100%")  # a percent of the device, as the setting reads it
    assert change.stats.memory_budget_bytes == cache.device_total_bytes
    assert gauge(metrics, "voxserve_memory_budget_bytes", device="cpu") == cache.device_total_bytes
    cache.acquire("whisper-d").release()
    assert ids(cache) == ["whisper-c", "whisper-d"] and change.evicted == ()


@pytest.mark.parametrize(
    ("max_models", "memory_budget", "field"),
    [
        (0, None, "max_models"),
        (-3, None, "max_models"),
        (1_000_000, None, "max_models"),
        (None, "lots", "memory_budget"),
        (None, "0", "memory_budget"),
        (None, "150%", "memory_budget"),
        (None, "9" * 40, "memory_budget"),
        (None, "x" * 500, "memory_budget"),
        (2, "12 parsecs", "memory_budget"),
    ],
)
def test_bad_limits_are_invalid_argument_naming_the_field_and_change_nothing(
    make_cache, max_models: int | None, memory_budget: str | None, field: str
) -> None:
    cache, _ = make_cache(max_models=3, memory_budget_bytes=2 * GiB)
    cache.acquire("whisper-a").release()
    with pytest.raises(InvalidArgument, match=field) as caught:
        cache.set_limits(max_models=max_models, memory_budget=memory_budget)
    assert len(str(caught.value)) < 300
    stats = cache.stats()
    assert (stats.max_models, stats.memory_budget_bytes, stats.loaded_models) == (3, 2 * GiB, 1)


def test_unchanged_limits_are_a_no_op(make_cache) -> None:
    cache, _ = make_cache(max_models=2, memory_budget_bytes=int(WHISPER_ESTIMATE * 3))
    cache.acquire("whisper-a").release()
    change = cache.set_limits()
    assert change.evicted == () and ids(cache) == ["whisper-a"]
    assert (change.stats.max_models, change.stats.memory_budget_bytes) == (2, int(WHISPER_ESTIMATE * 3))


# --------------------------------------------------------------------------- over gRPC


def stats_of(handle: InferenceHandle) -> pb.CacheStats:
    return handle.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)


def test_set_cache_limits_rpc_evicts_and_reports(start_inference: Callable[..., InferenceHandle]) -> None:
    inference = start_inference(max_models=3)
    for model_id in ("silero-vad", "whisper-tiny.en"):
        inference.stub.LoadModel(pb.LoadModelRequest(model_id=model_id), timeout=120)
    assert stats_of(inference).loaded_models == 2

    reply = inference.stub.SetCacheLimits(pb.SetCacheLimitsRequest(max_models=1), timeout=30)
    assert list(reply.evicted_model_ids) == ["silero-vad"]
    assert reply.stats.max_models == 1 and reply.stats.loaded_models == 1 and reply.stats.device == "cpu"
    assert stats_of(inference).max_models == 1
    loaded = inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=30)
    assert [m.model_id for m in loaded.models] == ["whisper-tiny.en"]

    reply = inference.stub.SetCacheLimits(pb.SetCacheLimitsRequest(memory_budget="3GiB"), timeout=30)
    assert reply.stats.memory_budget_bytes == 3 * GiB and reply.stats.max_models == 1
    assert not reply.evicted_model_ids
    budget = inference.app.metrics.registry.get_sample_value("voxserve_memory_budget_bytes", {"device": "cpu"})
    assert budget == 3 * GiB


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.SetCacheLimitsRequest(max_models=0), "max_models"),
        (pb.SetCacheLimitsRequest(memory_budget="a lot"), "memory_budget"),
        (pb.SetCacheLimitsRequest(max_models=2, memory_budget="-1GiB"), "memory_budget"),
    ],
)
def test_set_cache_limits_rpc_refuses_bad_values(
    inference: InferenceHandle, request_: pb.SetCacheLimitsRequest, field: str
) -> None:
    before = stats_of(inference)
    with pytest.raises(grpc.RpcError) as caught:
        inference.stub.SetCacheLimits(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
    after = stats_of(inference)
    assert (after.max_models, after.memory_budget_bytes) == (before.max_models, before.memory_budget_bytes)


class GatedLoader(Loader):
    """Loads tiny.en; the load of ``gated`` waits for ``release`` after setting ``loading``."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated
        self.loading = threading.Event()
        self.release = threading.Event()

    def __call__(self, spec):  # type: ignore[no-untyped-def]
        if spec.model_id == self.gated:
            self.loading.set()
            assert self.release.wait(60)
        return super().__call__(spec)


def test_limits_lowered_during_a_load_hold_once_it_ends() -> None:
    loader = GatedLoader("whisper-c")
    cache = ModelCache(CacheConfig(max_models=3), Resolver(), loader)  # type: ignore[arg-type]
    acquired, done = threading.Event(), threading.Event()
    try:
        cache.acquire("whisper-a").release()
        cache.acquire("whisper-b").release()

        def hold_c() -> None:
            with cache.acquire("whisper-c"):
                acquired.set()
                done.wait(60)

        loading = threading.Thread(target=hold_c)
        loading.start()
        assert loader.loading.wait(60)
        # a and b idle, c loading: a leaves the cache now; its memory is freed once the load
        # ends (freeing waits for the load lock, so that the load is measured alone).
        changes = []
        setter = threading.Thread(target=lambda: changes.append(cache.set_limits(max_models=1)))
        setter.start()
        wait_for(lambda: ids(cache) == ["whisper-b"], timeout=60, message="whisper-a evicted")
        loader.release.set()
        setter.join(120)
        assert acquired.wait(60)
        assert changes[0].evicted == ("whisper-a",)
        assert ids(cache) == ["whisper-c"]  # b left when c's load ended, c still in use
        done.set()
        loading.join(60)
        assert all(m.closed for mid in ("whisper-a", "whisper-b") for m in loader.models[mid])
    finally:
        loader.release.set()
        done.set()
        cache.close()


def test_set_cache_limits_needs_the_admin_role(start_inference: Callable[..., InferenceHandle], tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokens = {"reader": ("tok-read-1a2b3c", ["read"]), "user": ("tok-user-4d5e6f", ["transcribe", "read"])}
    tokens["ops"] = ("tok-admin-7a8b9c", ["admin"])
    path = tmp_path / "tokens.yaml"
    entries = {
        name: {"sha256": hashlib.sha256(t.encode()).hexdigest(), "roles": roles} for name, (t, roles) in tokens.items()
    }
    path.write_text(yaml.safe_dump({"tokens": entries}))
    inference = start_inference(auth_tokens=path)
    request = pb.SetCacheLimitsRequest(max_models=2)
    for name in ("reader", "user"):
        with pytest.raises(grpc.RpcError) as caught:
            inference.stub.SetCacheLimits(
                request, metadata=[("authorization", f"Bearer {tokens[name][0]}")], timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in (caught.value.details() or "")
    assert inference.cache.max_models == 3
    reply = inference.stub.SetCacheLimits(
        request, metadata=[("authorization", f"Bearer {tokens['ops'][0]}")], timeout=30
    )
    assert reply.stats.max_models == 2 == inference.cache.max_models
