"""The inference service tells the model store being down from the store being up with its
hub sources failing: different status, different message; it retries only the first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from inference_service.config import InferenceConfig
from inference_service.metrics import InferenceMetrics
from inference_service.model_source import StoreModelSource
from tests.hubserver import refused_endpoint
from tests.support import DATA_DIR, InferenceHandle, StoreHandle, free_port
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.errors import NotFound, Unavailable

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()


def test_a_store_that_cannot_be_reached_is_unavailable_after_retries(tmp_path: Path) -> None:
    source = StoreModelSource(InferenceConfig(model_store=f"127.0.0.1:{free_port()}", cache_dir=tmp_path))
    try:
        with pytest.raises(Unavailable, match="model store unreachable while looking up test-tiny"):
            source.describe("test-tiny")
    finally:
        source.close()


def test_a_store_whose_sources_fail_is_failed_precondition_not_unavailable(
    start_store: Callable[..., StoreHandle], start_inference: Callable[..., InferenceHandle]
) -> None:
    store = start_store(hub_endpoints=(refused_endpoint(),), download_retries=1)
    inference = start_inference(store=store, default_model="test-tiny")
    with pytest.raises(grpc.RpcError) as caught:
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=120))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    assert "the model store could not download while pulling test-tiny" in details
    assert "every hub source failed" in details and "unreachable" not in details


def sample(metrics: InferenceMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_an_unreachable_store_counts_as_store_unreachable_and_clears_the_reachable_gauge(
    tmp_path: Path, start_store: Callable[..., StoreHandle]
) -> None:
    metrics = InferenceMetrics()
    assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 0
    assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 0
    assert sample(metrics, "voxserve_store_reachable") == 0  # no contact yet
    port = free_port()
    source = StoreModelSource(InferenceConfig(model_store=f"127.0.0.1:{port}", cache_dir=tmp_path), metrics=metrics)
    try:
        with pytest.raises(Unavailable):
            source.describe("test-tiny")
        assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 1
        assert sample(metrics, "voxserve_store_reachable") == 0

        start_store(port=port)  # the store comes up on that address: the next call reaches it
        assert source.describe("test-tiny").model_id == "test-tiny"
        assert sample(metrics, "voxserve_store_reachable") == 1
        with pytest.raises(NotFound):  # an answer, even an error, is contact
            source.describe("no-such-model")
        assert sample(metrics, "voxserve_store_reachable") == 1
        assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 1
        assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 0
    finally:
        source.close()


def test_failing_sources_count_as_sources_failed_with_the_store_reachable(
    start_store: Callable[..., StoreHandle], start_inference: Callable[..., InferenceHandle]
) -> None:
    store = start_store(hub_endpoints=(refused_endpoint(),), download_retries=1)
    inference = start_inference(store=store, default_model="test-tiny")
    metrics: InferenceMetrics = inference.app.metrics
    assert sample(metrics, "voxserve_store_reachable") == 1  # the start-up check reached it
    with pytest.raises(grpc.RpcError):
        list(inference.stub.Transcribe(pb.TranscribeRequest(audio=SHORT), timeout=120))
    assert sample(metrics, "voxserve_store_failures_total", reason="sources_failed") == 1
    assert sample(metrics, "voxserve_store_failures_total", reason="store_unreachable") == 0
    assert sample(metrics, "voxserve_store_reachable") == 1
