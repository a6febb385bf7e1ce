"""ModelStore: the domain behind the ModelStore RPCs (no grpc here): its parts, their life cycle.

Each module does one job and imports only the ones below it:

    download/  reconcile.py  importer.py  reader.py    the jobs (never import each other)
    registry.py                                        records, lock, directories, state.json, views
    progress.py                                        byte counts and PROGRESS events of a download

The servicer calls the part that does the job (``store.downloads.request``,
``store.reader.iter_file_chunks``, ``store.registry.view``, ...); ModelStore itself holds
what spans parts: start-up, SIGHUP, shutdown, the listing and DeleteModel.

A package rather than sibling modules so that every store log line keeps the
``model_service.store`` logger prefix it always had (operators and tests filter on it).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

from model_service.catalog import Catalog
from model_service.config import ModelStoreConfig
from model_service.errors import ModelBusy
from model_service.events import EventBus
from model_service.metrics import ModelStoreMetrics
from model_service.paths import remove_path
from model_service.state import BUSY_STATES, ModelState
from model_service.store.data_dir_lock import DataDirLock
from model_service.store.download.hub import HubClient
from model_service.store.download.service import DownloadService
from model_service.store.importer import Importer, ImportLimits
from model_service.store.reader import ModelReader
from model_service.store.reconcile import Reconciler
from model_service.store.registry import ModelRegistry, ModelView

__all__ = ["RELOADABLE_STORE_SETTINGS", "ModelStore"]

logger = logging.getLogger(__name__)

# Settings ModelStore.apply_reloadable_settings changes in a running store: each is read when
# it is used (per event, request, retry or download), so a new value is simply in force
# from the next use.
RELOADABLE_STORE_SETTINGS = frozenset(
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

    The parts: ``registry`` (views and snapshots, safe on the event loop), ``downloads``
    (PullModel, cancel, pause, resume, ListSources), ``reconciler`` (VerifyModel),
    ``importer`` (ImportModel), ``reader`` (FetchModelFiles), ``bus`` (the events). Every
    method that touches the disk or the network belongs in a worker thread.
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
        self.downloads = DownloadService(self.registry, catalog, hub, config, self.metrics)
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
        self._data_dir_lock = DataDirLock(self.registry.data_dir)
        self.scan_done = threading.Event()
        self._scan_thread: threading.Thread | None = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Lock the data dir, load state.json at once and queue again the downloads a
        graceful stop left (unless resume_downloads_on_start is off); reconcile with the
        disk in a background thread. Raises DataDirInUse (a ConfigError) when another
        process holds the data dir."""
        self._data_dir_lock.acquire()
        try:
            self.registry.restore()
            self.downloads.restore_queue(self.config.resume_downloads_on_start)
        except BaseException:
            self._data_dir_lock.release()
            raise
        self._scan_thread = threading.Thread(target=self._startup_scan, name="startup-scan", daemon=True)
        self._scan_thread.start()

    def apply_reloadable_settings(self, new: ModelStoreConfig) -> None:
        """SIGHUP: put the RELOADABLE_STORE_SETTINGS of ``new`` in force (the rest stays as it
        started). ValueError for a value that fails validation (nothing changes then)."""
        new.validate()
        reloaded = {name: getattr(new, name) for name in RELOADABLE_STORE_SETTINGS}
        config = dataclasses.replace(self.config, **reloaded)
        self.bus.progress_interval = 1.0 / config.progress_events_per_second
        self.downloads.apply_config(config)
        self.config = config
        logger.info("reloadable settings applied", extra={"settings": reloaded})

    @property
    def writable(self) -> bool:
        """False while a state file cannot be written (disk full, read-only filesystem):
        the store serves on, but a restart would lose what changed, so it is not ready."""
        return self.registry.writes.healthy

    def close(self) -> None:
        """Stop the downloads (partial files kept), write what state is pending, unlock."""
        try:
            self.downloads.stop()
            if self._scan_thread is not None:
                self._scan_thread.join(5)
            self.registry.writes.close()
        finally:
            self._data_dir_lock.release()

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

    # ----------------------------------------------------------------- what spans parts

    def list_models(self, kind: str | None = None) -> list[ModelView]:
        """The catalog's models (of one kind if given) as they are now; refreshes the gauges."""
        ids = {entry.model_id for entry in self.catalog if kind is None or entry.kind == kind}
        views = self.registry.snapshot(ids)[0] if ids else []
        self.registry.refresh_gauges()
        return views

    def model_dir(self, model_id: str) -> Path:
        """Where a model's verified files live (tests/inference reads a pulled model there)."""
        return self.registry.model_dir(model_id)

    def delete(self, model_id: str) -> ModelView:
        """Remove a model's files; ModelBusy while it downloads or is being fetched."""
        self.catalog.get(model_id)
        registry = self.registry
        with registry.locked():
            settled = registry.record(model_id).state not in BUSY_STATES
        if settled:  # a client that saw READY may delete before the job has left the queue
            self.downloads.wait_finishing(model_id)
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
