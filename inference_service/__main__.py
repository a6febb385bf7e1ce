"""Entry point: ``voxserve-inference`` runs the inference service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NoReturn

from inference_service.batch_telemetry import BatchTelemetry
from inference_service.config import InferenceConfig
from inference_service.engines.batching import BatchSettings
from inference_service.engines.device import BLAS_THREADS, choose_device
from inference_service.engines.loaders import make_loader
from inference_service.engines.schedulers import DecodeSchedulers
from inference_service.job_retention import RetentionLimits
from inference_service.jobs import JobLimits, JobManager
from inference_service.live.service import LiveLimits, LiveService
from inference_service.memory import MemoryProbe, parse_memory_budget, pin_malloc_thresholds, release_freed_heap
from inference_service.metrics import InferenceMetrics
from inference_service.model_cache import CacheConfig, ModelCache
from inference_service.model_copies import reloading_loader
from inference_service.model_source import StoreModelSource
from inference_service.servicer import InferenceServicer
from inference_service.transcriber import Transcriber
from voxserve.inference.v1 import inference_pb2, inference_pb2_grpc
from voxserve_common.cli import common_parser, config_from_args
from voxserve_common.errors import Unavailable, VoxserveError
from voxserve_common.security import server_security
from voxserve_common.server import RunningServer, start_server
from voxserve_common.service import run_service

logger = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass
class InferenceApp:
    """A running inference service: cache, jobs, store client and gRPC server."""

    config: InferenceConfig
    cache: ModelCache
    jobs: JobManager
    source: StoreModelSource
    server: RunningServer
    metrics: InferenceMetrics
    schedulers: DecodeSchedulers
    transcriber: Transcriber
    live: LiveService | None = None
    preload_thread: threading.Thread | None = None
    stopping: threading.Event = field(default_factory=threading.Event)

    # Settings a SIGHUP applies without a restart (besides the log levels): the cache's limits
    # (the path SetCacheLimits takes), warm-up, the watchdog, auto_pull (read at each resolve),
    # and the batch size and window (each decode scheduler reads them before its next batch;
    # the batched pipeline at its next job), the prompt bucket (for jobs opened after), and the retention of ended jobs (in force at once).
    # The others (ports, TLS, the store's address, device, job admission and live limits) are
    # built into objects at start-up and are reported as needing a restart.
    reloadable_settings: ClassVar[frozenset[str]] = frozenset(
        {
            "max_models",
            "memory_budget",
            "warmup",
            "watchdog_threshold",
            "watchdog_interval_seconds",
            "auto_pull",
            "batch_size",
            "batch_window_ms",
            "prompt_bucket_tokens",
            "model_idle_ttl_seconds",  # the watchdog's thread unloads idle models
            "job_retention_seconds",
            "job_retention_max_jobs",
            "job_retention_max_bytes",
        }
    )

    @property
    def port(self) -> int:
        return self.server.port

    def apply_reloadable_settings(self, new: InferenceConfig) -> None:
        """SIGHUP: apply the reloadable settings that differ from the ones in force. A bad value
        raises InvalidArgument before anything changes (the running settings stay)."""
        old = self.config
        # Only the limits the file changed: one SetCacheLimits made since is not undone.
        max_models = new.max_models if new.max_models != old.max_models else None
        budget = new.memory_budget if new.memory_budget != old.memory_budget else None
        self.cache.check_limits(max_models, budget)
        watchdog = ("watchdog_threshold", "watchdog_interval_seconds", "model_idle_ttl_seconds")
        if any(getattr(old, name) != getattr(new, name) for name in watchdog):
            self.cache.set_watchdog(*(getattr(new, name) for name in watchdog))
        if max_models is not None or budget is not None:
            change = self.cache.set_limits(max_models, budget)
            logger.info(
                "cache limits reloaded",
                extra={"max_models": change.stats.max_models, "memory_budget_bytes": change.stats.memory_budget_bytes},
            )
        self.cache.warmup = new.warmup
        if old.auto_pull != new.auto_pull:
            self.source.config = dataclasses.replace(self.source.config, auto_pull=new.auto_pull)
        if batch_settings(old) != batch_settings(new):
            self.schedulers.set_settings(batch_settings(new))
            self.transcriber.batch_size = pipeline_batch_size(old.batched, new.batch_size)
            logger.info("batch settings reloaded", extra=dataclasses.asdict(batch_settings(new)))
        if job_retention(old) != job_retention(new):
            self.jobs.set_retention(job_retention(new))
            logger.info("job retention reloaded", extra={"job_retention": job_retention(new).describe()})
        self.config = dataclasses.replace(old, **{name: getattr(new, name) for name in self.reloadable_settings})

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        self.stopping.set()
        if self.live is not None:
            self.live.close()
        self.jobs.close(wait=True)
        self.cache.close()
        self.source.close()


def batch_settings(config: InferenceConfig) -> BatchSettings:
    return BatchSettings(
        batch_size=config.batch_size,
        batch_window_ms=config.batch_window_ms,
        prompt_bucket_tokens=config.prompt_bucket_tokens,
    )


def pipeline_batch_size(batched: bool, batch_size: int) -> int:
    """The batched pipeline's chunks per call (0: the pipeline is off, the default)."""
    return batch_size if batched else 0


def build_cache(
    config: InferenceConfig, source: StoreModelSource, metrics: InferenceMetrics, schedulers: DecodeSchedulers
) -> ModelCache:
    device = choose_device(config.device, config.compute_type)
    probe = MemoryProbe()
    budget = parse_memory_budget(config.memory_budget, probe.device_total_bytes(device.device))
    cache_config = CacheConfig(
        max_models=config.max_models,
        memory_budget_bytes=budget,
        device=device.device,
        watchdog_interval_seconds=config.watchdog_interval_seconds,
        watchdog_threshold=config.watchdog_threshold,
        pinned=tuple(config.pin),
        warmup=config.warmup,
        idle_ttl_seconds=config.model_idle_ttl_seconds,
    )
    # A load that fails on a damaged copy in cache_dir fetches the copy again and loads once more.
    load = reloading_loader(
        make_loader(device, config.cpu_threads, schedulers, config.decode_replicas), source.copies, source.resolve
    )
    return ModelCache(cache_config, source.resolve, load, metrics, probe)


STORE_CONTACT_BACKOFF = (1.0, 30.0)  # seconds: first and longest wait between rounds of retries


def wait_for_store(source: StoreModelSource, stopping: threading.Event) -> bool:
    """Call the store (each round has its own quick retries) until it answers, backing off
    exponentially with jitter between rounds; False when ``stopping`` was set first.

    An answer that is an error (a wrong token: PERMISSION_DENIED) is not a successful
    contact either: requests would fail the same way, so the service stays not ready and
    the error is logged at each round.
    """
    delay, longest = STORE_CONTACT_BACKOFF
    while not stopping.is_set():
        try:
            count = source.check_store()
        except VoxserveError as error:
            level = logging.WARNING if isinstance(error, Unavailable) else logging.ERROR
            logger.log(
                level,
                "model store not reached yet; not ready",
                extra={"error": str(error), "retry_in": round(delay, 1)},
            )
        else:
            logger.info("model store reached", extra={"model_store": source.config.model_store, "models": count})
            return not stopping.is_set()
        if stopping.wait(delay * random.uniform(0.8, 1.2)):
            break
        delay = min(delay * 2, longest)
    return False


def job_retention(config: InferenceConfig) -> RetentionLimits:
    return RetentionLimits(config.job_retention_seconds, config.job_retention_max_jobs, config.job_retention_max_bytes)


def live_limits(config: InferenceConfig) -> LiveLimits:
    return LiveLimits(
        max_streams=config.live_max_streams,
        endpoint_silence=config.live_endpoint_silence_seconds,
        max_lag=config.live_max_lag_seconds,
        abandon_lag=config.live_abandon_lag_seconds,
        decode_interval=config.live_decode_interval_seconds,
        beam_size=config.live_beam_size,
        final_beam_size=config.live_final_beam_size,
        window_bucket=config.live_window_bucket_seconds,
    )


async def start_app(config: InferenceConfig, preload_in_background: bool = True) -> InferenceApp:
    """Start the service; the start-up work (reach the store, then preload) runs behind so the
    server is alive at once ("" SERVING) and ready (its service name SERVING) after it;
    preload_in_background=False (tests) returns only once ready."""
    blas = BLAS_THREADS.limit(config.blas_threads)
    logger.info("numpy BLAS threads", extra={"blas_threads": config.blas_threads, "blas": blas})
    metrics = InferenceMetrics()
    source = StoreModelSource(config, metrics=metrics)
    await asyncio.to_thread(source.copies.sweep_staging)  # before any fetch can stage a copy
    schedulers = DecodeSchedulers(batch_settings(config), BatchTelemetry(metrics))
    cache = build_cache(config, source, metrics, schedulers)
    transcriber = Transcriber(
        cache,
        config.vad_model,
        metrics,
        pipeline_batch_size(config.batched, config.batch_size),
        config.fast_first_segment,
        config.diarization_model,
    )
    limits = JobLimits(
        config.max_running_jobs, config.max_queued_jobs, config.job_history_events, job_retention(config)
    )
    jobs = JobManager(limits, transcriber.run, metrics, on_idle=release_freed_heap)
    shutting_down = asyncio.Event()
    live = LiveService(cache, config.vad_model, live_limits(config), metrics)
    servicer = InferenceServicer(jobs, cache, config.default_model, config.max_audio_bytes, shutting_down, live)
    tls, authenticator = server_security(config, "inference_service")
    server = await start_server(
        register=lambda s: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, s),
        service_names=[SERVICE_NAME],
        host=config.host,
        port=config.port,
        rpc_metrics=metrics.rpc,
        metrics_registry=metrics.registry,
        metrics_port=config.metrics_port,
        disk_paths={"cache": config.cache_dir},
        service_label="inference_service",
        tls=tls,
        authenticator=authenticator,
        ready=False,
    )
    app = InferenceApp(config, cache, jobs, source, server, metrics, schedulers, transcriber, live)
    server.on_stop.append(shutting_down.set)
    server.on_stop.append(app.stopping.set)
    loop = asyncio.get_running_loop()
    cache.start_watchdog()
    wanted = [(model_id, model_id in config.pin) for model_id in config.preload]
    wanted += [(model_id, True) for model_id in config.pin if model_id not in config.preload]

    def start_up() -> None:
        """Readiness: the service name is SERVING once the store has answered and the preload is done."""
        if not wait_for_store(source, app.stopping):
            return
        for model_id, error in cache.preload(wanted):
            logger.warning(
                "preload failed; the model loads on first use instead",
                extra={"model_id": model_id, "error": str(error)},
            )
        if not app.stopping.is_set():
            asyncio.run_coroutine_threadsafe(server.set_ready(True), loop)
            logger.info("inference service ready for requests", extra={"preloaded": [m for m, _ in wanted]})

    if preload_in_background:
        app.preload_thread = threading.Thread(target=start_up, name="start-up", daemon=True)
        app.preload_thread.start()
    else:
        await asyncio.to_thread(start_up)
    logger.info("inference service started", extra={"model_store": config.model_store, "device": cache.config.device})
    return app


def parse_config(argv: Sequence[str] | None = None) -> InferenceConfig:
    parser = common_parser("voxserve-inference", "voxserve inference service: model cache and streaming transcription")
    parser.add_argument("--model-store", metavar="ADDR", help="model store address host:port")
    parser.add_argument("--cache-dir", type=Path, help="local copies of models fetched from the store")
    parser.add_argument("--max-models", type=int, help="most models held in memory at once")
    parser.add_argument("--memory-budget", metavar="BYTES|PERCENT", help="memory for loaded models, e.g. 4GiB or 60%%")
    parser.add_argument(
        "--store-access", choices=("shared", "fetch"), help="read the store's directory or copy files over gRPC"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--store-tls-ca", type=Path, metavar="FILE", help="CA that signed the store's certificate")
    parser.add_argument("--store-tls-cert", type=Path, metavar="FILE", help="client certificate for the store (mTLS)")
    parser.add_argument("--store-tls-key", type=Path, metavar="FILE", help="the client certificate's key")
    parser.add_argument("--store-token-file", type=Path, metavar="FILE", help="file holding this service's store token")
    args = parser.parse_args(argv)
    return config_from_args(
        InferenceConfig,
        args,
        {
            "model_store": args.model_store,
            "cache_dir": args.cache_dir,
            "max_models": args.max_models,
            "memory_budget": args.memory_budget,
            "store_access": args.store_access,
            "device": args.device,
            "store_tls_ca": args.store_tls_ca,
            "store_tls_cert": args.store_tls_cert,
            "store_tls_key": args.store_tls_key,
            "store_token_file": args.store_token_file,
        },
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    pin_malloc_thresholds()  # before any thread starts: the arena limit binds only arenas made after it
    run_service(
        service="inference_service",
        program="voxserve-inference",
        config=parse_config(argv),
        start=start_app,
        close=lambda app: app.close(),
        reload=lambda: parse_config(argv),
    )


if __name__ == "__main__":
    main()
