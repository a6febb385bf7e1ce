"""ModelStore: the domain behind the ModelStore RPCs (no grpc here), a facade over its modules.

Each module does one job and imports only the ones below it:

    pull.py  reconcile.py  importer.py  reader.py    the jobs (never import each other)
    pipeline.py  queue_file.py                       one download job's pipeline, queue.json (pull.py's)
    registry.py                                      records, lock, directories, state.json, views
    progress.py                                      byte counts and PROGRESS events of a download

A package rather than sibling modules so that every store log line keeps the
``model_service.store`` logger prefix it always had (operators and tests filter on it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path

from model_service.catalog import Catalog
from model_service.config import ModelStoreConfig
from model_service.errors import ModelBusy
from model_service.events import EventBus
from model_service.hub import HubClient, SourceHealth
from model_service.metrics import ModelStoreMetrics
from model_service.paths import remove_path
from model_service.state import BUSY_STATES, ModelRecord, ModelState
from model_service.store.importer import Importer, ImportLimits
from model_service.store.pull import PullService, PullTicket
from model_service.store.reader import DEFAULT_FETCH_CHUNK, MAX_FETCH_CHUNK, FileChunkData, ModelReader
from model_service.store.reconcile import Reconciler, VerifyResult
from model_service.store.registry import FileView, ModelRegistry, ModelView

__all__ = [
    "LIVE_STORE_SETTINGS",
    "MAX_FETCH_CHUNK",
    "FileChunkData",
    "FileView",
    "ModelStore",
    "ModelView",
    "PullTicket",
    "SourceHealth",
    "VerifyResult",
]

logger = logging.getLogger(__name__)

# Settings ModelStore.apply_live_settings changes in a running store: each is read when
# it is used (per event, request, retry or download), so a new value is simply in force
# from the next use.
LIVE_STORE_SETTINGS = frozenset(
    {
        "progress_events_per_second",
        "breaker_failures",
        "breaker_cooldown_seconds",
        "download_retries",
        "hub_timeout_seconds",
        "disk_reserve_bytes",
    }
)


class ModelStore:
    """Downloads, imports, verifies, deletes and streams models; publishes every change.

    ``get_model`` and ``snapshot`` are safe on the event loop (a short lock, file stats);
    every other method blocks on disk or network and belongs in a worker thread.
    """

    def __init__(
        self,
        config: ModelStoreConfig,
        catalog: Catalog,
        hub: HubClient,
        metrics: ModelStoreMetrics | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.hub = hub
        self.metrics = metrics or ModelStoreMetrics()
        self.bus = EventBus(
            config.event_history, 1.0 / config.progress_events_per_second, first_sequence=int(time.time() * 1000)
        )
        self.registry = ModelRegistry(config.data_dir, catalog, self.bus, self.metrics)
        self.data_dir = self.registry.data_dir
        self.models_dir = self.registry.models_dir
        self.partial_dir = self.registry.partial_dir
        self.staging_dir = self.registry.staging_dir
        self.downloads = PullService(self.registry, catalog, hub, config, self.metrics)
        self.queue = self.downloads.queue
        self.fetcher = self.downloads.fetcher
        self.reconciler = Reconciler(self.registry, self.metrics)
        limits = ImportLimits(config.import_roots, config.max_import_bytes, config.max_import_files)
        self.importer = Importer(
            self.registry,
            self.downloads.is_downloading,
            limits,
            on_imported=self.downloads.forget_paused,
            spans=self.downloads.spans,
            copy_block=config.download_chunk_bytes,
        )
        self.reader = ModelReader(self.registry)
        self.scan_done = threading.Event()
        self._scan_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Load state.json at once and queue again the pulls a graceful stop left (unless
        resume_downloads_on_start is off); reconcile with the disk in a background thread."""
        self.registry.restore()
        self.downloads.restore_queue(self.config.resume_downloads_on_start)
        self._scan_thread = threading.Thread(target=self._startup_scan, name="startup-scan", daemon=True)
        self._scan_thread.start()

    def apply_live_settings(self, new: ModelStoreConfig) -> None:
        """SIGHUP: put the LIVE_STORE_SETTINGS of ``new`` in force (the rest stays as it
        started). ValueError for a value that fails validation (nothing changes then)."""
        new.validate()
        live = {name: getattr(new, name) for name in LIVE_STORE_SETTINGS}
        config = dataclasses.replace(self.config, **live)
        self.bus.progress_interval = 1.0 / config.progress_events_per_second
        self.downloads.apply_config(config)
        self.config = config
        logger.info("live settings applied", extra={"settings": live})

    def close(self) -> None:
        self.downloads.stop()
        if self._scan_thread is not None:
            self._scan_thread.join(5)

    def _startup_scan(self) -> None:
        started = time.monotonic()
        try:
            self.reconciler.scan(deep=self.config.verify_on_startup)
            if self.config.import_embedded:
                self.importer.import_embedded()
        finally:
            self.scan_done.set()
            self.registry.refresh_gauges()
            logger.info("startup scan finished", extra={"seconds": round(time.monotonic() - started, 3)})

    # ----------------------------------------------------------------- reads

    def list_models(self, kind: str | None = None) -> list[ModelView]:
        ids = {entry.model_id for entry in self.catalog if kind is None or entry.kind == kind}
        views = self.registry.snapshot(ids)[0] if ids else []
        self.registry.refresh_gauges()
        return views

    def get_model(self, model_id: str) -> ModelView:
        """One model's view; ModelNotFound for ids outside the catalog. Event-loop safe."""
        return self.registry.view(model_id)

    def snapshot(self, model_ids: set[str] | None = None) -> tuple[list[ModelView], int]:
        """Every model's view and the sequence it corresponds to, taken atomically."""
        return self.registry.snapshot(model_ids)

    def model_dir(self, model_id: str) -> Path:
        return self.registry.model_dir(model_id)

    @property
    def records(self) -> Mapping[str, ModelRecord]:
        return self.registry.records()

    @property
    def _readers(self) -> Mapping[str, int]:
        """Open FetchModelFiles holds per model (tests wait for a release through it)."""
        return self.registry.reader_counts()

    # ----------------------------------------------------------------- changes

    def pull(self, model_id: str, revision: str | None = None, source: str | None = None) -> PullTicket:
        """Start, join, resume or short-circuit a download (see PullService.pull)."""
        return self.downloads.pull(model_id, revision, source)

    def cancel(self, model_id: str, wait_seconds: float = 15.0) -> ModelView:
        """Stop a running, waiting or paused download; its partial files are removed."""
        self.downloads.cancel(model_id, wait_seconds)
        return self.get_model(model_id)

    def pause(self, model_id: str, wait_seconds: float = 15.0) -> ModelView:
        """Stop a running or waiting download keeping its bytes: PAUSED, no queue slot."""
        self.downloads.pause(model_id, wait_seconds)
        return self.get_model(model_id)

    def resume(self, model_id: str) -> ModelView:
        """Queue a PAUSED model again (at the end); it continues from the bytes on disk."""
        self.downloads.resume(model_id)
        return self.get_model(model_id)

    def list_sources(self) -> list[SourceHealth]:
        """Every configured hub endpoint with its health and breaker state, in order."""
        return self.downloads.source_health()

    def delete(self, model_id: str) -> ModelView:
        """Remove a model's files; ModelBusy while it downloads or is being fetched."""
        self.catalog.get(model_id)
        registry = self.registry
        with registry.locked():
            record = registry.record(model_id)
            if record.state in BUSY_STATES or self.downloads.is_downloading(model_id):
                raise ModelBusy(f"{model_id} is {record.state.value}; cancel the download first (CancelDownload)")
            readers = registry.readers(model_id)
            if readers:
                raise ModelBusy(
                    f"{model_id} is being copied by {readers} FetchModelFiles stream(s); retry when they end"
                )
            remove_path(registry.model_dir(model_id))
            remove_path(registry.partial_root(model_id))
            self.downloads.forget_paused(model_id)
            registry.transition(
                model_id, ModelState.NOT_DOWNLOADED, message="deleted", files=(), revision="", source="", error=""
            )
        logger.info("model deleted", extra={"model_id": model_id})
        return registry.view(model_id)

    def verify(self, model_id: str) -> VerifyResult:
        """Re-hash every file now; READY when all match, INCOMPLETE otherwise."""
        return self.reconciler.verify(model_id)

    def import_model(self, model_id: str, source_dir: str) -> ModelView:
        """Copy a model from a directory on this host (or its embedded copy when
        source_dir is empty), hashing as it copies; READY only when complete."""
        return self.importer.import_model(model_id, source_dir)

    # ----------------------------------------------------------------- fetch files

    @contextlib.contextmanager
    def reading(self, model_id: str) -> Iterator[ModelView]:
        """Hold a READY model so DeleteModel refuses while its files are streamed."""
        with self.reader.reading(model_id) as view:
            yield view

    def iter_file_chunks(
        self, model_id: str, chunk_size: int = DEFAULT_FETCH_CHUNK, paths: list[str] | None = None
    ) -> Generator[FileChunkData, None, None]:
        """The bytes of a READY model's files in order, with size and sha256 of each."""
        return self.reader.iter_file_chunks(model_id, chunk_size, paths)
