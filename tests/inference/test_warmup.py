"""Warm-up inside the load (a real decode of silence through real tiny.en, seen in faster-whisper's
own log record), and the inference.model_load span: hit/miss, bytes, device, parent span."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from inference_service.engines.device import choose_device
from inference_service.engines.loaders import make_loader
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import CacheConfig, ModelCache, ModelLoadFailed
from inference_service.warmup import WARMUP_AUDIO_SECONDS, warm_up
from tests.inference.test_model_cache import Loader, Resolver
from tests.support import InferenceHandle
from voxserve.inference.v1 import inference_pb2 as pb

MakeCache = Callable[..., ModelCache]


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def make_cache(spans: InMemorySpanExporter) -> Iterator[MakeCache]:
    """ModelCache loading real WhisperEngines (tiny.en, int8 on CPU), its spans on a provider of its own."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    caches: list[ModelCache] = []

    def make(
        load: Callable[..., object] | None = None, metrics: InferenceMetrics | None = None, **config: object
    ) -> ModelCache:
        loader = load or make_loader(choose_device("cpu", None), cpu_threads=2)
        cache = ModelCache(
            CacheConfig(**config),  # type: ignore[arg-type]
            Resolver(),
            loader,  # type: ignore[arg-type]
            metrics=metrics,
            tracer=provider.get_tracer("test"),
        )
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()
    provider.shutdown()


@contextlib.contextmanager
def capture_info(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """INFO records of the root logger and of faster_whisper, whose level an earlier test's
    logging set-up may have raised to WARNING (its library default)."""
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="faster_whisper"):
        yield


def library_decodes(records: list[logging.LogRecord]) -> list[str]:
    """faster-whisper's own record of each transcribe() call it starts."""
    return [r.getMessage() for r in records if r.name == "faster_whisper" and "Processing audio" in r.getMessage()]


def test_warmup_decodes_silence_inside_the_load(make_cache: MakeCache, caplog: pytest.LogCaptureFixture) -> None:
    metrics = InferenceMetrics()
    cache = make_cache(metrics=metrics, warmup=True)
    with capture_info(caplog):
        lease = cache.acquire("whisper-a")
    lease.release()
    assert library_decodes(caplog.records) == ["Processing audio with duration 00:01.000"]
    warmed = next(r for r in caplog.records if r.getMessage() == "model warmed up")
    assert warmed.model_id == "whisper-a" and warmed.audio_seconds == WARMUP_AUDIO_SECONDS  # type: ignore[attr-defined]
    loaded = next(r for r in caplog.records if r.getMessage() == "model loaded")
    assert loaded.warmup_seconds == warmed.warmup_seconds  # type: ignore[attr-defined]
    # The load's time includes the warm-up: the lease, the log record and the histogram agree.
    assert lease.load_seconds >= warmed.warmup_seconds > 0  # type: ignore[attr-defined]
    observed = metrics.registry.get_sample_value("voxserve_model_load_duration_seconds_sum", {"model_id": "whisper-a"})
    assert observed == pytest.approx(lease.load_seconds)

    caplog.clear()
    with capture_info(caplog):
        cache.acquire("whisper-a").release()  # a hit: no load, no warm-up
    assert library_decodes(caplog.records) == []


def test_no_warmup_when_the_setting_is_off(make_cache: MakeCache, caplog: pytest.LogCaptureFixture) -> None:
    cache = make_cache(warmup=False)
    with capture_info(caplog):
        cache.acquire("whisper-a").release()
    assert library_decodes(caplog.records) == []
    assert not [r for r in caplog.records if r.getMessage() == "model warmed up"]
    loaded = next(r for r in caplog.records if r.getMessage() == "model loaded")
    assert loaded.warmup_seconds is None  # type: ignore[attr-defined]

    cache.warmup = True  # the live setting: the next load warms up
    with capture_info(caplog):
        cache.acquire("whisper-b").release()
    assert len(library_decodes(caplog.records)) == 1


def test_only_whisper_models_are_warmed_up(make_cache: MakeCache, caplog: pytest.LogCaptureFixture) -> None:
    cache = make_cache(load=Loader(), warmup=True)  # a model that is not a WhisperEngine
    with capture_info(caplog):
        cache.acquire("whisper-a").release()
    assert library_decodes(caplog.records) == []
    assert warm_up(object()) is None


def test_a_failing_warmup_fails_the_load_and_closes_the_model(make_cache: MakeCache) -> None:
    built = []
    real = make_loader(choose_device("cpu", None), cpu_threads=2)

    def load_then_break(spec):  # type: ignore[no-untyped-def]
        engine = real(spec)
        built.append(engine)
        engine.close()  # closed before the warm-up: its decode cannot run
        return engine

    cache = make_cache(load=load_then_break, warmup=True)
    with pytest.raises(ModelLoadFailed, match="warm-up decode of model 'whisper-a' failed"):
        cache.acquire("whisper-a")
    assert cache.loaded() == [] and cache.stats().load_failures == 1 and len(built) == 1


# --------------------------------------------------------------------------- the span


def by_name(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


def test_model_load_span_records_miss_and_hit_under_the_callers_span(
    make_cache: MakeCache, spans: InMemorySpanExporter
) -> None:
    cache = make_cache(warmup=False)
    tracer = TracerProvider().get_tracer("caller")  # another provider: only the parent ids matter
    with tracer.start_as_current_span("rpc") as rpc:
        # The load runs in a worker thread, in a copy of the caller's context (as the servicer does).
        context = contextvars.copy_context()
        worker = threading.Thread(target=lambda: context.run(lambda: cache.acquire("whisper-a").release()))
        worker.start()
        worker.join(120)
        cache.acquire("whisper-a").release()
    miss, hit = by_name(spans, "inference.model_load")
    for span in (miss, hit):
        assert span.parent is not None and span.parent.span_id == rpc.get_span_context().span_id
        assert span.attributes is not None
        assert span.attributes["voxserve.model_id"] == "whisper-a"
        assert span.attributes["voxserve.device"] == "cpu"
        assert span.attributes["voxserve.model.bytes"] == cache.loaded()[0].memory_bytes > 0
    assert miss.attributes is not None and hit.attributes is not None
    assert miss.attributes["voxserve.cache.hit"] is False and hit.attributes["voxserve.cache.hit"] is True
    assert "voxserve.model.load_seconds" in miss.attributes and "voxserve.model.load_seconds" not in hit.attributes
    assert miss.end_time is not None and miss.start_time is not None and hit.end_time is not None
    assert by_name(spans, "rpc") == []  # the caller's provider is not the cache's

    spans.clear()
    cache.touch_loaded("whisper-a")  # LoadModel of a loaded model: a hit span too
    (touched,) = by_name(spans, "inference.model_load")
    assert touched.attributes is not None and touched.attributes["voxserve.cache.hit"] is True


def test_a_failed_load_ends_its_span_with_an_error(make_cache: MakeCache, spans: InMemorySpanExporter) -> None:
    cache = make_cache(load=Loader(failures={"whisper-bad": 1}))
    with pytest.raises(ModelLoadFailed):
        cache.acquire("whisper-bad")
    (span,) = by_name(spans, "inference.model_load")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None and "voxserve.cache.hit" not in span.attributes
    assert any(event.name == "exception" for event in span.events)


def test_warmup_setting_reaches_the_service(start_inference: Callable[..., InferenceHandle], caplog) -> None:
    inference = start_inference(warmup=False)
    assert inference.cache.warmup is False
    with capture_info(caplog):
        inference.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"), timeout=120)
    assert library_decodes(caplog.records) == []
    inference.stop()
    warm = start_inference(warmup=True)
    caplog.clear()
    with capture_info(caplog):
        warm.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"), timeout=120)
    assert len(library_decodes(caplog.records)) == 1
