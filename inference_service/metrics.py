"""Prometheus metrics of the inference service (names are what the Grafana dashboards query)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voxserve_common.metrics import RpcMetrics

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
TTFS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
LIVE_LATENCY_BUCKETS = (0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
LIVE_LAG_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 10, 20, 30)
DECODE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
BATCH_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SPEAKER_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 15)
STORE_FAILURE_REASONS = ("store_unreachable", "sources_failed")


class InferenceMetrics:
    """Every metric the inference service exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.rpc = RpcMetrics(r)
        self._cache_metrics(r)
        self._job_metrics(r)
        self._live_metrics(r)
        self._batch_metrics(r)
        self._store_metrics(r)

    def _cache_metrics(self, r: CollectorRegistry) -> None:
        """The model cache: hits, misses, evictions, loads, memory."""
        self.cache_hits = Counter("voxserve_cache_hits", "Model cache hits.", ["model_id"], registry=r)
        self.cache_misses = Counter(
            "voxserve_cache_misses", "Model cache misses (a load was needed).", ["model_id"], registry=r
        )
        self.cache_evictions = Counter(
            "voxserve_cache_evictions",
            "Models evicted (unloaded), by reason: count_limit and memory_budget (least recently used, to make "
            "room), watchdog (memory pressure), idle (unused for model_idle_ttl_seconds), unload (UnloadModel).",
            ["model_id", "reason"],
            registry=r,
        )
        self.model_loads = Counter(
            "voxserve_model_loads", "Model loads, by result (ok, error).", ["model_id", "result"], registry=r
        )
        self.load_duration = Histogram(
            "voxserve_model_load_duration_seconds",
            "Time to load a model into memory.",
            ["model_id"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.loaded_models = Gauge("voxserve_loaded_models", "Models currently loaded.", registry=r)
        self.loaded_model_bytes = Gauge(
            "voxserve_loaded_model_bytes", "Measured memory of each loaded model.", ["model_id"], registry=r
        )
        self.memory_used_bytes = Gauge(
            "voxserve_memory_used_bytes", "Memory held by loaded models, by device (cpu, cuda).", ["device"], registry=r
        )
        self.memory_budget_bytes = Gauge(
            "voxserve_memory_budget_bytes", "Memory budget of the model cache, by device.", ["device"], registry=r
        )

    def _job_metrics(self, r: CollectorRegistry) -> None:
        """Transcription jobs: states, outcomes, queue, audio processed and speed."""
        self.jobs = Gauge("voxserve_jobs", "Transcription jobs by current state.", ["state"], registry=r)
        self.jobs_finished = Counter(
            "voxserve_jobs_finished",
            "Jobs that ended, by outcome (completed, failed, cancelled).",
            ["outcome"],
            registry=r,
        )
        self.job_queue_length = Gauge("voxserve_job_queue_length", "Jobs admitted and waiting to run.", registry=r)
        self.jobs_retained = Gauge(
            "voxserve_jobs_retained", "Ended jobs kept so that WatchJob can replay their events.", registry=r
        )
        self.jobs_retained_bytes = Gauge(
            "voxserve_jobs_retained_bytes",
            "Estimated memory of the ended jobs kept (their events; an ended job holds no audio).",
            registry=r,
        )
        self.jobs_evicted = Counter(
            "voxserve_jobs_evicted",
            "Ended jobs dropped from retention, by reason (expired, count_limit, bytes_limit).",
            ["reason"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "voxserve_audio_seconds_processed", "Seconds of audio transcribed.", ["model_id"], registry=r
        )
        self.real_time_factor = Histogram(
            "voxserve_real_time_factor",
            "Processing seconds / audio seconds per job.",
            ["model_id"],
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.time_to_first_segment = Histogram(
            "voxserve_time_to_first_segment_seconds",
            "From request to the first segment sent.",
            ["model_id"],
            buckets=TTFS_BUCKETS,
            registry=r,
        )
        self.diarization_duration = Histogram(
            "voxserve_diarization_duration_seconds",
            "Time to find who spoke when in one job's audio (VAD, embeddings, clustering).",
            ["model_id"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.diarization_speakers = Histogram(
            "voxserve_diarization_speakers",
            "Speakers found per diarized job.",
            ["model_id"],
            buckets=SPEAKER_BUCKETS,
            registry=r,
        )

    def _live_metrics(self, r: CollectorRegistry) -> None:
        """Live streams: latency, lag, streams, draft rewrites, decode time."""
        self.live_time_to_first_result = Histogram(
            "voxserve_live_time_to_first_result_seconds",
            "Live streams: from the arrival of the audio where speech started to the first result sent.",
            ["model_id"],
            buckets=LIVE_LATENCY_BUCKETS,
            registry=r,
        )
        self.live_final_latency = Histogram(
            "voxserve_live_final_result_latency_seconds",
            "Live streams: wall time a final result was sent minus the wall time its audio end arrived.",
            ["model_id"],
            buckets=LIVE_LATENCY_BUCKETS,
            registry=r,
        )
        self.live_lag = Histogram(
            "voxserve_live_lag_seconds",
            "Live streams: audio received minus audio processed, after each decode.",
            ["model_id"],
            buckets=LIVE_LAG_BUCKETS,
            registry=r,
        )
        self.live_max_lag = Gauge(
            "voxserve_live_max_lag_seconds", "Live streams: the largest lag among the active streams.", registry=r
        )
        self.live_streams_active = Gauge("voxserve_live_streams_active", "Live streams open now.", registry=r)
        self.live_streams_finished = Counter(
            "voxserve_live_streams_finished",
            "Live streams that ended, by outcome (completed, cancelled, overloaded, failed).",
            ["outcome"],
            registry=r,
        )
        self.live_draft_rewrites = Counter(
            "voxserve_live_draft_rewrites",
            "Live interim results whose text is not an extension of the previous draft of the same result.",
            ["model_id"],
            registry=r,
        )
        self.live_drafts_dropped = Counter(
            "voxserve_live_drafts_dropped",
            "Live draft decodes dropped because a final's decode was due (their results never sent).",
            ["model_id"],
            registry=r,
        )
        self.live_decode_seconds = Histogram(
            "voxserve_live_decode_seconds",
            "Live streams: compute time of one decode of a stream's buffer.",
            ["model_id"],
            buckets=DECODE_BUCKETS,
            registry=r,
        )

    def _batch_metrics(self, r: CollectorRegistry) -> None:
        """The decode schedulers: encoder/decoder calls of every job and stream run in shared batches."""
        self.decode_batch_size = Histogram(
            "voxserve_decode_batch_size",
            "Items (one job's encoder or decoder call each) in one batched CTranslate2 call, by op (encode, generate).",
            ["model_id", "op"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.decode_items_waiting = Gauge(
            "voxserve_decode_items_waiting",
            "Encoder/decoder calls waiting for a batch on the model's decode scheduler.",
            ["model_id"],
            registry=r,
        )
        self.decode_wait = Histogram(
            "voxserve_decode_wait_seconds",
            "Time an encoder/decoder call waited for its batch to start, by lane (latency, file).",
            ["model_id", "lane"],
            buckets=BATCH_WAIT_BUCKETS,
            registry=r,
        )
        self.decode_items = Counter(
            "voxserve_decode_items",
            "Encoder/decoder calls run in batches, by op and lane (rate() = items decoded per second).",
            ["model_id", "op", "lane"],
            registry=r,
        )

    def _store_metrics(self, r: CollectorRegistry) -> None:
        """The model store as this service sees it: down (unreachable) vs. up with its sources failing."""
        self.store_failures = Counter(
            "voxserve_store_failures",
            "Calls to the model store that failed, by reason: store_unreachable (the store could not be "
            "reached after the retries), sources_failed (the store answered that its hub sources failed).",
            ["reason"],
            registry=r,
        )
        for reason in STORE_FAILURE_REASONS:
            self.store_failures.labels(reason)
        self.store_reachable = Gauge(
            "voxserve_store_reachable",
            "1 when the last call reached the model store, 0 after the retries against an unreachable store "
            "gave up (0 until the first contact).",
            registry=r,
        )
