"""Prometheus metrics of the model store (names are what the Grafana dashboards query)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voxserve_common.metrics import RpcMetrics

DOWNLOAD_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ModelStoreMetrics:
    """Every metric the model store exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rpc = RpcMetrics(r)
        self.downloads_started = Counter(
            "voxserve_downloads_started", "Downloads started, by model and source.", ["model_id", "source"], registry=r
        )
        self.downloads_completed = Counter(
            "voxserve_downloads_completed",
            "Downloads that ended READY, by model and source.",
            ["model_id", "source"],
            registry=r,
        )
        self.downloads_failed = Counter(
            "voxserve_downloads_failed",
            "Downloads that ended in ERROR or were cancelled, by model, source and reason.",
            ["model_id", "source", "reason"],
            registry=r,
        )
        self.download_bytes = Counter(
            "voxserve_download_bytes", "Bytes received from hub sources.", ["model_id", "source"], registry=r
        )
        self.download_duration = Histogram(
            "voxserve_download_duration_seconds",
            "Wall time of completed downloads, queue wait excluded.",
            ["model_id"],
            buckets=DOWNLOAD_DURATION_BUCKETS,
            registry=r,
        )
        self.download_speed = Gauge(
            "voxserve_download_speed_bytes_per_second",
            "Current download speed (0 when idle).",
            ["model_id"],
            registry=r,
        )
        self.queue_length = Gauge("voxserve_download_queue_length", "Downloads waiting for a slot.", registry=r)
        self.models_by_state = Gauge("voxserve_models", "Catalog models by state.", ["state"], registry=r)
        self.model_disk_bytes = Gauge("voxserve_model_disk_bytes", "Bytes on disk per model.", ["model_id"], registry=r)
        self.disk_free_bytes = Gauge("voxserve_disk_free_bytes", "Free bytes on the store's filesystem.", registry=r)
        self.verification_failures = Counter(
            "voxserve_verification_failures", "Files that failed size or hash verification.", ["model_id"], registry=r
        )
        self.source_up = Gauge(
            "voxserve_source_up",
            "1 while a hub source's circuit breaker is closed, 0 while it is open or probing.",
            ["source"],
            registry=r,
        )
        self.source_failures = Counter(
            "voxserve_source_failures",
            "Failed requests to a hub source, by source and reason (http_5xx, timeout, ...).",
            ["source", "reason"],
            registry=r,
        )
        self.active_watchers = Gauge(
            "voxserve_active_watchers", "Open WatchModels and PullModel streams.", ["rpc"], registry=r
        )
