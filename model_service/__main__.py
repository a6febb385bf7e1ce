"""Entry point: ``voxserve-models`` runs the model store until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

from model_service.catalog import Catalog, CatalogEntry
from model_service.config import ModelStoreConfig
from model_service.metrics import ModelStoreMetrics
from model_service.servicer import ModelStoreServicer
from model_service.store import RELOADABLE_STORE_SETTINGS, ModelStore
from model_service.store.download.hub import HubClient
from model_service.store.download.sources import default_sources
from voxserve.modelstore.v1 import modelstore_pb2, modelstore_pb2_grpc
from voxserve_common.cli import common_parser, config_from_args
from voxserve_common.security import server_security
from voxserve_common.server import RunningServer, start_server
from voxserve_common.service import run_service

logger = logging.getLogger(__name__)

SERVICE_NAME = modelstore_pb2.DESCRIPTOR.services_by_name["ModelStore"].full_name


@dataclass
class ModelStoreApp:
    """A running model store: domain object, gRPC server and the shutdown flag.

    Implements voxserve_common.service.ReloadableSettings: SIGHUP applies the settings in
    ``reloadable_settings``; the others are reported as needing a restart.
    """

    store: ModelStore
    server: RunningServer
    shutting_down: asyncio.Event
    servicer: ModelStoreServicer

    # Read afresh by every new stream, event or request, so changing them mid-run is safe
    # (max_concurrent_downloads, data_dir, endpoints, ports, ... are fixed at start-up).
    reloadable_settings: ClassVar[frozenset[str]] = RELOADABLE_STORE_SETTINGS | {"heartbeat_seconds"}

    @property
    def port(self) -> int:
        return self.server.port

    def apply_reloadable_settings(self, new: ModelStoreConfig) -> None:
        """SIGHUP: the new heartbeat for streams opened from now on, the rest in the store."""
        self.store.apply_reloadable_settings(new)
        self.servicer.heartbeat_seconds = new.heartbeat_seconds

    async def stop(self, grace: float | None = 1.0) -> None:
        await self.server.stop(grace)
        await asyncio.to_thread(self.store.close)


def build_store(config: ModelStoreConfig, extra_catalog: dict[str, CatalogEntry] | None = None) -> ModelStore:
    """The domain object with its catalog and hub chain (no server)."""
    catalog = Catalog.load(config.catalog_file, extra_catalog)
    sources = default_sources(config.hub_endpoints, os.environ.get("HF_ENDPOINT"))
    hub = HubClient(sources, timeout=config.hub_timeout_seconds, token=config.hf_token)
    return ModelStore(config, catalog, hub, ModelStoreMetrics())


async def start_app(config: ModelStoreConfig, extra_catalog: dict[str, CatalogEntry] | None = None) -> ModelStoreApp:
    """Start the store and its gRPC server (SERVING at once; the disk scan runs behind).
    Raises DataDirInUse (exit 2) when another store holds the data dir."""
    store = build_store(config, extra_catalog)
    store.start()
    try:
        shutting_down = asyncio.Event()
        servicer = ModelStoreServicer(store, config.heartbeat_seconds, shutting_down)
        tls, authenticator = server_security(config, "model_service")
        server = await start_server(
            register=lambda s: modelstore_pb2_grpc.add_ModelStoreServicer_to_server(servicer, s),
            service_names=[SERVICE_NAME],
            host=config.host,
            port=config.port,
            rpc_metrics=store.metrics.rpc,
            metrics_registry=store.metrics.registry,
            metrics_port=config.metrics_port,
            disk_paths={"data": store.data_dir},
            service_label="model_service",
            tls=tls,
            authenticator=authenticator,
            ready=False,
        )
    except BaseException:
        await asyncio.to_thread(store.close)  # unlocks the data dir
        raise
    server.on_stop.append(servicer.shut_down)
    _follow_readiness(store, server, shutting_down)
    logger.info(
        "model store ready",
        extra={
            "data_dir": str(store.data_dir),
            "hub_endpoints": list(store.hub.endpoints),
            "models": len(store.catalog.ids()),
        },
    )
    return ModelStoreApp(store, server, shutting_down, servicer)


def _follow_readiness(store: ModelStore, server: RunningServer, shutting_down: asyncio.Event) -> None:
    """Readiness is SERVING once the start-up scan has set the models' states, and while
    the state files can be written (a full disk makes it NOT_SERVING until a retried write
    succeeds); liveness stays SERVING throughout."""
    loop = asyncio.get_running_loop()

    async def update() -> None:  # reads the conditions when it runs: updates never race
        if not shutting_down.is_set():
            await server.set_ready(store.scan_done.is_set() and store.writable)
            if shutting_down.is_set():  # a stop began meanwhile: draining is never ready
                await server.set_ready(False)

    def changed(_: bool = True) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the process is ending
            asyncio.run_coroutine_threadsafe(update(), loop)

    store.registry.writes.add_listener(changed)

    def after_scan() -> None:
        store.scan_done.wait()
        changed()

    threading.Thread(target=after_scan, name="readiness", daemon=True).start()


def parse_config(argv: Sequence[str] | None = None) -> ModelStoreConfig:
    parser = common_parser("voxserve-models", "voxserve model store: downloads, validates and serves speech models")
    parser.add_argument("--data-dir", type=Path, help="directory for models and state (default data/models)")
    parser.add_argument(
        "--hub-endpoint",
        action="append",
        dest="hub_endpoints",
        metavar="[NAME=]URL",
        help="hub endpoint, repeatable, tried in order, optionally named (default: $HF_ENDPOINT, then https://huggingface.co)",
    )
    parser.add_argument(
        "--catalog", type=Path, dest="catalog_file", help="YAML file adding or overriding catalog models"
    )
    parser.add_argument("--max-concurrent-downloads", type=int)
    args = parser.parse_args(argv)
    return config_from_args(
        ModelStoreConfig,
        args,
        {
            "data_dir": args.data_dir,
            "hub_endpoints": args.hub_endpoints,
            "catalog_file": args.catalog_file,
            "max_concurrent_downloads": args.max_concurrent_downloads,
        },
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    run_service(
        service="model_service",
        program="voxserve-models",
        config=parse_config(argv),
        start=start_app,
        close=lambda app: app.store.close(),
        reload=lambda: parse_config(argv),
    )


if __name__ == "__main__":
    main()
