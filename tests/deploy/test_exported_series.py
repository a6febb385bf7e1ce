"""What the services export, as Prometheus stores it, and the PromQL reader the other deploy
tests check alerts and dashboards with."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from inference_service.metrics import InferenceMetrics
from model_service.metrics import ModelStoreMetrics
from tests.deploy.promql import Series, check_expr, exported_series, metric_wrappers


def test_exported_series_include_counter_and_histogram_suffixes(all_series: dict[str, Series]) -> None:
    assert "voxserve_rpc_requests_total" in all_series
    assert "voxserve_rpc_requests" not in all_series
    assert "le" in all_series["voxserve_real_time_factor_bucket"].labels
    assert "voxserve_real_time_factor" not in all_series
    assert "voxserve_download_queue_length" in all_series


@pytest.mark.parametrize("make", [ModelStoreMetrics, InferenceMetrics])
def test_exported_series_are_what_the_registry_renders(make: type[ModelStoreMetrics | InferenceMetrics]) -> None:
    metrics = make()
    for wrapper in metric_wrappers(metrics):
        child = wrapper.labels(*["x"] * len(wrapper._labelnames)) if wrapper._labelnames else wrapper
        if hasattr(child, "observe"):
            child.observe(1)
        elif hasattr(child, "inc"):
            child.inc()
    text = generate_latest(metrics.registry).decode()
    rendered = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert rendered == set(exported_series(metrics))


def test_check_expr_reports_unknown_metrics_and_labels(all_series: dict[str, Series]) -> None:
    assert check_expr('sum by (model_id) (rate(voxserve_cache_hits_total{job="x"}[5m]))', all_series) == []
    assert check_expr("voxserve_cache_hits", all_series)  # counter without _total
    assert check_expr('voxserve_cache_hits_total{state="x"}', all_series)
    assert check_expr("sum by (state) (voxserve_cache_hits_total)", all_series)
    assert check_expr("voxserve_no_such_metric", all_series)
