"""Entry point: ``voxserve-http`` runs the HTTP gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from voxserve_common.cli import common_parser, config_from_args
from voxserve_common.logs import configure_logging
from voxserve_common.metrics import ErrorCountingHandler, MetricsEndpoint, runtime_metrics, start_metrics_endpoint
from voxserve_common.tracing import setup_tracing, shutdown_tracing
from voxserve_http.app import create_app
from voxserve_http.config import GatewayConfig
from voxserve_http.metrics import GatewayMetrics
from voxserve_http.state import Gateway

logger = logging.getLogger(__name__)

SERVICE = "http_gateway"


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app when shutdown begins: readiness turns
    503 and event streams end, while transcriptions in flight finish within the grace."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured signal once it has stopped, which kills the process
        # before main() flushes logs and spans; a graceful stop here exits 0 like the services.
        self._captured_signals.clear()
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        app = self.config.app
        gateway: Gateway | None = getattr(getattr(app, "state", None), "gateway", None)
        loop = getattr(self, "loop", None)
        if gateway is not None and loop is not None:
            loop.call_soon_threadsafe(gateway.shutting_down.set)


class GatewayServer:
    """The app on uvicorn: ``await serve()`` until ``stop()`` or a signal; ``port`` is
    the bound one (pass port 0 in tests)."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.app = create_app(config, self.metrics)
        self.uvicorn = _Server(
            uvicorn.Config(
                self.app,
                host=config.host,
                port=config.port,
                log_config=None,  # records go to the root logger: JSON like the services
                access_log=False,  # ObservabilityMiddleware logs one line per request
                server_header=False,
                lifespan="on",
                # after this, requests still running are cancelled (0: at once)
                timeout_graceful_shutdown=math.ceil(config.grace_seconds),
            )
        )

    @property
    def started(self) -> bool:
        return bool(self.uvicorn.started)

    @property
    def port(self) -> int:
        (server,) = self.uvicorn.servers
        return int(server.sockets[0].getsockname()[1])

    async def serve(self) -> None:
        self.uvicorn.loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
        await self.uvicorn.serve()

    def stop(self) -> None:
        """Begin a graceful shutdown (from any thread)."""
        self.uvicorn.should_exit = True
        self.uvicorn.begin_shutdown()


def parse_config(argv: Sequence[str] | None = None) -> GatewayConfig:
    parser = common_parser(
        "voxserve-http", "voxserve HTTP gateway: OpenAI-compatible transcription and REST model management"
    )
    parser.add_argument("--inference", metavar="ADDR", help="inference service address (default 127.0.0.1:50052)")
    parser.add_argument(
        "--store", dest="model_store", metavar="ADDR", help="model store address (default 127.0.0.1:50051)"
    )
    parser.add_argument("--max-upload-bytes", type=int, help="413 for request bodies over this (default 200 MiB)")
    args = parser.parse_args(argv)
    return config_from_args(
        GatewayConfig,
        args,
        {"inference": args.inference, "model_store": args.model_store, "max_upload_bytes": args.max_upload_bytes},
    )


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(argv)
    configure_logging(SERVICE, level=config.log_level, fmt=config.log_format)
    try:
        setup_tracing(SERVICE)
    except ValueError as error:
        print(f"voxserve-http: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    server = GatewayServer(config)
    runtime = runtime_metrics(server.metrics.registry)
    errors = ErrorCountingHandler(runtime.errors, SERVICE)
    logging.getLogger().addHandler(errors)
    endpoint: MetricsEndpoint | None = None
    try:
        if config.metrics_port >= 0:
            endpoint = start_metrics_endpoint(server.metrics.registry, config.host, config.metrics_port)
        asyncio.run(server.serve())
    except OSError as error:
        logger.error("service failed", extra={"error": str(error)})
        print(f"voxserve-http: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if endpoint is not None:
            endpoint.stop()
        logging.getLogger().removeHandler(errors)
        shutdown_tracing()
    if not server.started:
        raise SystemExit(1)  # uvicorn logged why (a port in use, a failed start-up)
    logger.info("gateway stopped")


if __name__ == "__main__":
    main()
