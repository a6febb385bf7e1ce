"""model_idle_ttl_seconds: an idle, unpinned model nobody used for that long is unloaded (real tiny.en loads),
counted as reason "idle", reloadable with SIGHUP's path; pinned and leased models stay."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import grpc
import pytest

from inference_service.config import InferenceConfig
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import CacheConfig, ModelCache
from tests.inference.test_model_cache import Loader, Resolver, hold_in_thread
from tests.support import InferenceHandle, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.config import ConfigError
from voxserve_common.errors import InvalidArgument

MakeCache = Callable[..., tuple[ModelCache, Loader, InferenceMetrics]]


@pytest.fixture
def make_cache() -> Iterator[MakeCache]:
    caches: list[ModelCache] = []

    def make(**config: object) -> tuple[ModelCache, Loader, InferenceMetrics]:
        loader, metrics = Loader(), InferenceMetrics()
        cache = ModelCache(CacheConfig(**config), Resolver(), loader, metrics=metrics)  # type: ignore[arg-type]
        caches.append(cache)
        return cache, loader, metrics

    yield make
    for cache in caches:
        cache.close()


def loaded(cache: ModelCache) -> set[str]:
    return {info.model_id for info in cache.loaded()}


def idle_unloads(metrics: InferenceMetrics, model_id: str) -> float | None:
    return metrics.registry.get_sample_value("voxserve_cache_evictions_total", {"model_id": model_id, "reason": "idle"})


def test_an_idle_model_is_unloaded_and_pinned_or_leased_ones_stay(make_cache: MakeCache) -> None:
    cache, loader, metrics = make_cache(max_models=4, idle_ttl_seconds=0.3, pinned=("whisper-pinned",))
    cache.acquire("whisper-idle").release()
    cache.acquire("whisper-pinned").release()
    done, holder = hold_in_thread(cache, "whisper-leased")
    try:
        # Polled: the models are due 0.3 s after their last use, however slow the machine is.
        wait_for(lambda: cache.expire_idle_once() == ["whisper-idle"], timeout=30, message="the idle model expires")
        assert loaded(cache) == {"whisper-pinned", "whisper-leased"}
        assert loader.models["whisper-idle"][0].closed
        assert cache.expire_idle_once() == []  # pinned and in use: older than the TTL, kept
    finally:
        done.set()
        holder.join(30)
    # Released: the watchdog's thread unloads it on its own once it has been idle for the TTL.
    cache.start_watchdog()
    wait_for(lambda: loaded(cache) == {"whisper-pinned"}, timeout=30, message="the released model expires")
    assert idle_unloads(metrics, "whisper-idle") == 1 and idle_unloads(metrics, "whisper-leased") == 1
    assert idle_unloads(metrics, "whisper-pinned") is None
    assert cache.stats().evictions_by_reason["idle"] == 2


def test_a_model_in_use_again_is_not_unloaded(make_cache: MakeCache) -> None:
    """Each use starts the idle time again: a model used more often than the TTL stays."""
    cache, _, _ = make_cache(idle_ttl_seconds=3600)
    cache.acquire("whisper-busy").release()
    assert cache.expire_idle_once() == [] and loaded(cache) == {"whisper-busy"}


def test_ttl_zero_never_unloads_and_a_negative_ttl_is_refused(make_cache: MakeCache) -> None:
    cache, _, _ = make_cache()
    cache.acquire("whisper-a").release()
    assert cache.config.idle_ttl_seconds == 0
    assert cache.expire_idle_once() == [] and loaded(cache) == {"whisper-a"}
    with pytest.raises(InvalidArgument, match="model_idle_ttl_seconds must be >= 0"):
        cache.set_watchdog(idle_ttl_seconds=-1)
    assert cache.config.idle_ttl_seconds == 0
    with pytest.raises(ConfigError, match="model_idle_ttl_seconds"):
        InferenceConfig(model_idle_ttl_seconds=-5).validate()


def test_a_reload_turns_idle_unload_on(start_inference: Callable[..., InferenceHandle]) -> None:
    """SIGHUP's path (apply_reloadable_settings): the new TTL is in force without a restart."""
    handle = start_inference()
    handle.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"), timeout=120)
    app = handle.app
    assert "model_idle_ttl_seconds" in app.reloadable_settings
    app.apply_reloadable_settings(dataclasses.replace(app.config, model_idle_ttl_seconds=0.2))
    assert app.config.model_idle_ttl_seconds == 0.2

    def unloaded() -> bool:
        listed = handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=10)
        return not listed.models

    wait_for(unloaded, timeout=30, message="the idle model unloaded after the reload")
    sample = app.metrics.registry.get_sample_value
    assert sample("voxserve_cache_evictions_total", {"model_id": "whisper-tiny.en", "reason": "idle"}) == 1
    with pytest.raises(grpc.RpcError) as caught:  # unloaded: not a pinned survivor
        handle.stub.UnloadModel(pb.UnloadModelRequest(model_id="whisper-tiny.en"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
