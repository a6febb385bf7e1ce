"""The inference service's models: auto-pull from the loopback hub, fetch mode, VAD,
vocal separation with a tiny Demucs bag, LRU/pinning through the RPCs, metrics, tracing."""

from __future__ import annotations

import logging
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

from model_service.catalog import CatalogEntry
from tests.support import (
    DATA_DIR,
    TINY_EN_DIR,
    TINY_EN_FILES,
    InferenceHandle,
    make_catalog,
    sha256,
    transcribe,
    wait_for,
)
from tests.tiny_demucs import export_tiny_demucs_bag
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb
from voxserve_common.logs import ContextFilter

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()


def text_of(events: list[pb.TranscribeEvent]) -> str:
    return " ".join(e.segment.text for e in events if e.WhichOneof("event") == "segment").lower()


def phases(events: list[pb.TranscribeEvent]) -> list[int]:
    return [e.progress.phase for e in events if e.WhichOneof("event") == "progress"]


def test_auto_pull_through_the_store_relays_progress(start_store, start_inference, hub) -> None:
    store = start_store()
    handle = start_inference(store=store)
    events = transcribe(handle, SHORT, model_id="test-tiny")
    pulling = [
        e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.phase == pb.PULLING_MODEL
    ]
    assert pulling, "no PULLING_MODEL progress was relayed"
    # (this hub has no VAD model: fast_first_segment's pull of it fails and the plain path runs)
    whisper_bytes = sum((TINY_EN_DIR / n).stat().st_size for n in TINY_EN_FILES)
    assert any(p.bytes_total == whisper_bytes and p.bytes_done == whisper_bytes for p in pulling)
    assert "report" in text_of(events)
    assert store.stub.GetModel(store_pb.GetModelRequest(model_id="test-tiny")).state == store_pb.READY
    assert hub.bytes_served() > 0


def test_auto_pull_off_is_failed_precondition(start_store, start_inference) -> None:
    handle = start_inference(store=start_store(), auto_pull=False)
    with pytest.raises(grpc.RpcError) as info:
        transcribe(handle, SHORT, model_id="test-tiny")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "auto_pull" in info.value.details()


def test_fetch_mode_copies_files_into_the_cache_dir_with_hashes(start_inference, tmp_path: Path) -> None:
    handle = start_inference(store_access="fetch", cache_dir=tmp_path / "node-cache")
    events = transcribe(handle, SHORT)
    assert "report" in text_of(events)
    copies = list((tmp_path / "node-cache" / "whisper-tiny.en").glob("*/model.bin"))
    assert len(copies) == 1
    for name in TINY_EN_FILES:
        copied = copies[0].parent / name
        assert sha256(copied) == sha256(TINY_EN_DIR / name)
    store_dir = handle.store.store.model_dir("whisper-tiny.en")
    assert not copies[0].is_relative_to(store_dir)


def test_vad_filter_uses_the_shipped_silero_model(inference: InferenceHandle) -> None:
    events = transcribe(inference, SHORT, vad_filter=True)
    assert pb.VAD in phases(events)
    assert "office" in text_of(events)
    loaded = {m.model_id: m for m in inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
    assert loaded["silero-vad"].kind == "vad"


def test_vocal_separation_with_a_tiny_demucs_bag(start_store, start_inference, tmp_path: Path) -> None:
    bag_dir = tmp_path / "tiny-demucs"
    yaml_path = export_tiny_demucs_bag(bag_dir)
    catalog = make_catalog()
    catalog["tiny-demucs"] = CatalogEntry(
        "tiny-demucs", "demucs", "test-org/tiny-demucs", "main", ("*.yaml", "*.safetensors"), (yaml_path.name,)
    )
    store = start_store(catalog=catalog, import_embedded=True)
    model = store.stub.ImportModel(store_pb.ImportModelRequest(model_id="tiny-demucs", source_dir=str(bag_dir)))
    assert model.state == store_pb.READY
    handle = start_inference(store=store)
    events = transcribe(handle, SHORT, separate_model_id="tiny-demucs")
    assert pb.SEPARATING in phases(events)
    assert events[-1].WhichOneof("event") == "completed"
    loaded = {m.model_id: m.kind for m in handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
    assert loaded["tiny-demucs"] == "demucs"
    with pytest.raises(grpc.RpcError) as info:
        transcribe(handle, SHORT, separate_model_id="whisper-tiny.en")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_lru_count_limit_and_pinning_through_rpcs(start_store, start_inference) -> None:
    store = start_store(import_embedded=True)
    store.stub.ImportModel(store_pb.ImportModelRequest(model_id="test-tiny", source_dir=str(TINY_EN_DIR)))
    handle = start_inference(store=store, max_models=2)
    pinned = handle.stub.LoadModel(pb.LoadModelRequest(model_id="silero-vad", pin=True))
    assert pinned.pinned and pinned.kind == "vad" and pinned.memory_bytes > 0
    handle.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"))
    handle.stub.LoadModel(pb.LoadModelRequest(model_id="test-tiny"))
    loaded = {m.model_id for m in handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
    assert loaded == {"silero-vad", "test-tiny"}  # whisper-tiny.en was the LRU unpinned model
    stats = handle.stub.GetCacheStats(pb.GetCacheStatsRequest())
    assert stats.evictions == 1 and stats.loads == 3 and stats.max_models == 2
    assert stats.memory_used_bytes > 0 and stats.memory_budget_bytes > stats.memory_used_bytes
    response = handle.stub.UnloadModel(pb.UnloadModelRequest(model_id="test-tiny"))
    assert response.unloaded and response.freed_bytes > 0
    with pytest.raises(grpc.RpcError) as info:
        handle.stub.UnloadModel(pb.UnloadModelRequest(model_id="test-tiny"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_load_requests_for_a_cold_model_load_once(inference: InferenceHandle) -> None:
    results: list = []

    def load() -> None:
        results.append(inference.stub.LoadModel(pb.LoadModelRequest(model_id="whisper-tiny.en"), timeout=120))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6
    stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest())
    assert stats.loads == 1 and stats.misses >= 1


def test_memory_budget_too_small_is_resource_exhausted(start_inference) -> None:
    handle = start_inference(memory_budget="1MiB")
    with pytest.raises(grpc.RpcError) as info:
        transcribe(handle, SHORT)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "budget" in info.value.details()


def test_metrics_endpoint_serves_cache_and_job_metrics(start_inference) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    handle = start_inference(metrics_port=0)
    transcribe(handle, SHORT)
    transcribe(handle, SHORT)
    port = handle.app.server.metrics_endpoint.port
    finished = ("voxserve_jobs_finished_total", (("outcome", "completed"),))

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    # The job's bookkeeping (outcome counters) ends just after its completed event is sent.
    wait_for(lambda: scrape().get(finished) == 2, timeout=30, message="both jobs counted as completed")
    samples = scrape()
    assert samples[("voxserve_cache_hits_total", (("model_id", "whisper-tiny.en"),))] >= 1
    assert samples[("voxserve_cache_misses_total", (("model_id", "whisper-tiny.en"),))] == 1
    assert samples[finished] == 2
    assert samples[("voxserve_audio_seconds_processed_total", (("model_id", "whisper-tiny.en"),))] == pytest.approx(
        6.48, abs=0.2
    )
    assert samples[("voxserve_real_time_factor_count", (("model_id", "whisper-tiny.en"),))] == 2
    assert samples[("voxserve_time_to_first_segment_seconds_count", (("model_id", "whisper-tiny.en"),))] == 2
    loaded = handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models
    assert samples[("voxserve_loaded_models", ())] == len(loaded)  # whisper, and the VAD of fast_first_segment
    method = "/voxserve.inference.v1.Inference/Transcribe"
    assert samples[("voxserve_rpc_requests_total", (("code", "OK"), ("method", method)))] == 2


def test_ids_the_store_does_not_know_share_one_metric_label(start_inference) -> None:
    """Made-up (well-formed) model ids are counted under model_id="(unknown)": a caller cannot
    create one metric series per id it invents."""
    from prometheus_client.parser import text_string_to_metric_families

    handle = start_inference(metrics_port=0)
    made_up = ["no-such-model-1", "no-such-model-2", "no-such-model-3"]
    for model_id in made_up:
        with pytest.raises(grpc.RpcError) as error:
            handle.stub.LoadModel(pb.LoadModelRequest(model_id=model_id), timeout=60)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    transcribe(handle, SHORT)  # a known model still gets its own label
    port = handle.app.server.metrics_endpoint.port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    labelled = {s.labels.get("model_id") for s in samples if "model_id" in s.labels}
    assert not labelled & set(made_up), labelled
    by_key = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples}
    assert by_key[("voxserve_cache_misses_total", (("model_id", "(unknown)"),))] == 3
    assert by_key[("voxserve_model_loads_total", (("model_id", "(unknown)"), ("result", "error")))] == 3
    assert by_key[("voxserve_cache_misses_total", (("model_id", "whisper-tiny.en"),))] == 1


def test_traceparent_continues_into_the_model_store(start_store, start_inference) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    collector = Collect()
    collector.addFilter(ContextFilter("test"))
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(collector)
    try:
        handle = start_inference(store=start_store(import_embedded=True))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        transcribe(handle, SHORT, metadata=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01")])
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    store_rpcs = [
        r for r in records if r.getMessage() == "rpc finished" and "ModelStore/GetModel" in getattr(r, "rpc_method", "")
    ]
    assert store_rpcs, "the store logged no GetModel call"
    assert {r.trace_id for r in store_rpcs} == {trace_id}
    job_lines = [r for r in records if r.name.startswith("inference_service") and getattr(r, "job_id", None)]
    assert job_lines and all(r.trace_id == trace_id for r in job_lines)
