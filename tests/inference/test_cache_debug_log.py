"""What the model cache decides, at DEBUG: a load and its estimate, a hit, an eviction and why, a
reservation refused; real tiny.en loads, model_id from the log context as in the service."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from inference_service.model_cache import CacheConfig, CacheFull, ModelCache
from tests.inference.test_model_cache import WHISPER_ESTIMATE, Loader, Resolver
from voxserve_common.logs import ContextFilter


@pytest.fixture
def debug_records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """DEBUG records of the cache, with the context fields the service's handlers add."""
    context = ContextFilter("test")
    caplog.handler.addFilter(context)
    caplog.set_level(logging.DEBUG, logger="inference_service.model_cache")
    yield caplog
    caplog.handler.removeFilter(context)


def decisions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records if r.name.startswith("inference_service.model_cache") and r.levelno == logging.DEBUG
    ]


def test_debug_records_say_what_the_cache_decided_and_why(debug_records: pytest.LogCaptureFixture) -> None:
    loader = Loader()
    cache = ModelCache(CacheConfig(max_models=1), Resolver(), loader)  # type: ignore[arg-type]
    try:
        cache.acquire("whisper-a").release()  # a miss: a load, with its estimate
        cache.acquire("whisper-a").release()  # a hit
        # A miss that evicts whisper-a (one model at most); whisper-b in use, the reservation cannot fit.
        with cache.acquire("whisper-b"), pytest.raises(CacheFull):
            cache.reserve(cache.memory_budget_bytes, "a big stream")
        cache.unload("whisper-b")
    finally:
        cache.close()

    records = decisions(debug_records)
    assert [(r.getMessage(), r.model_id) for r in records] == [  # type: ignore[attr-defined]
        ("model load planned", "whisper-a"),
        ("model cache hit", "whisper-a"),
        ("model load planned", "whisper-b"),
        ("model eviction chosen", "whisper-b"),  # the load of whisper-b chose to evict whisper-a
        ("memory reservation refused", None),
        ("model eviction chosen", "whisper-b"),
    ]
    first_load, hit, second_load, for_room, refused, unloaded = records
    assert first_load.estimate_bytes == WHISPER_ESTIMATE and first_load.loaded_models == 0  # type: ignore[attr-defined]
    assert hit.hits == 1 and hit.in_use == 1  # type: ignore[attr-defined]
    assert second_load.loaded_models == 1 and second_load.max_models == 1  # type: ignore[attr-defined]
    assert (for_room.evicted_model_id, for_room.reason, for_room.cause) == (  # type: ignore[attr-defined]
        "whisper-a",
        "count_limit",
        "lru_for_room",
    )
    assert refused.label == "a big stream" and refused.bytes == cache.memory_budget_bytes  # type: ignore[attr-defined]
    assert (unloaded.evicted_model_id, unloaded.reason, unloaded.cause) == ("whisper-b", "unload", "unload")  # type: ignore[attr-defined]
    assert loader.calls == {"whisper-a": 1, "whisper-b": 1}
