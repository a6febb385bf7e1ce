"""Entry point: ``voxserve-http`` runs the HTTP gateway until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

import uvicorn

from voxserve_common.banner import log_startup
from voxserve_common.cli import common_parser, config_from_args
from voxserve_common.config import ConfigError
from voxserve_common.log_levels import LogLevelControl
from voxserve_common.logs import stop_logging
from voxserve_common.metrics import ErrorCountingHandler, MetricsEndpoint, runtime_metrics, start_metrics_endpoint
from voxserve_common.service import RELOADABLE_SETTINGS, exit_without_finalizing, setup_logging
from voxserve_common.tracing import setup_tracing, shutdown_tracing
from voxserve_http.app import create_app
from voxserve_http.config import GatewayConfig
from voxserve_http.metrics import GatewayMetrics
from voxserve_http.security import GatewaySecurity, gateway_security
from voxserve_http.state import Gateway
from voxserve_http.tls import RotatingContext, ssl_context_factory

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
    the bound one (pass port 0 in tests). ConfigError for unusable TLS/token files or an
    open bind (the insecure rule), before anything listens."""

    def __init__(
        self, config: GatewayConfig, metrics: GatewayMetrics | None = None, security: GatewaySecurity | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.security = security or gateway_security(config)
        self.app = create_app(config, self.metrics, self.security)
        tls = self.security.server
        # HTTPS: uvicorn's SSL options from these files, in a context that follows them
        # when they change (voxserve_http/tls.py); mutual TLS with a client CA.
        self.rotation: list[RotatingContext] = []
        tls_options = (
            {
                "ssl_certfile": str(tls.cert),
                "ssl_keyfile": str(tls.key),
                "ssl_ca_certs": str(tls.client_ca) if tls.client_ca else None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.mutual else ssl.CERT_NONE,
                "ssl_context_factory": ssl_context_factory(tls, self.rotation),
            }
            if tls is not None
            else {}
        )
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
                # Realtime events up to twice realtime_max_message_bytes get an `error` event
                # from the session; larger ones close the connection (1009).
                ws_max_size=2 * config.realtime_max_message_bytes,
                **tls_options,  # type: ignore[arg-type]
            )
        )

    @property
    def scheme(self) -> str:
        return "https" if self.security.server is not None else "http"

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
    # The shared flags, as they read for the gateway.
    gateway_help = {
        "--port": "HTTP(S) port (default 8080)",
        "--insecure": "allow binding a non-loopback address with neither --tls-cert nor --backend-token-file",
        "--auth-tokens": "not for the gateway (it checks no tokens: the services do); refused",
    }
    for flag, text in gateway_help.items():
        parser._option_string_actions[flag].help = text
    parser.add_argument("--inference", metavar="ADDR", help="inference service address (default 127.0.0.1:50052)")
    parser.add_argument(
        "--store", dest="model_store", metavar="ADDR", help="model store address (default 127.0.0.1:50051)"
    )
    parser.add_argument("--max-upload-bytes", type=int, help="413 for request bodies over this (default 200 MiB)")
    for backend, name in (("store", "the model store"), ("inference", "the inference service")):
        parser.add_argument(
            f"--{backend}-tls-ca", type=Path, metavar="FILE", help=f"reach {name} over TLS, trusting this CA (PEM)"
        )
        parser.add_argument(
            f"--{backend}-tls-cert", type=Path, metavar="FILE", help=f"client certificate for {name} (mutual TLS)"
        )
        parser.add_argument(f"--{backend}-tls-key", type=Path, metavar="FILE", help="that client certificate's key")
    parser.add_argument(
        "--backend-token-file",
        type=Path,
        metavar="FILE",
        help="token sent to the backends for HTTP callers without an Authorization header (default: none)",
    )
    args = parser.parse_args(argv)
    own = (
        "max_upload_bytes",
        "store_tls_ca",
        "store_tls_cert",
        "store_tls_key",
        "inference_tls_ca",
        "inference_tls_cert",
        "inference_tls_key",
        "backend_token_file",
    )
    return config_from_args(
        GatewayConfig,
        args,
        {"inference": args.inference, "model_store": args.model_store, **{key: getattr(args, key) for key in own}},
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    config = parse_config(argv)
    setup_logging(SERVICE, config)  # log files, redaction (the backend token), library levels
    status = 0
    try:
        _run(config, lambda: parse_config(argv))
    except SystemExit as error:  # a configuration error (2) or a failed start (1), already said
        status = error.code if isinstance(error.code, int) else 1
    finally:
        stop_logging()
    exit_without_finalizing(status)


def _run(config: GatewayConfig, reload: Callable[[], GatewayConfig]) -> None:
    try:
        setup_tracing(SERVICE)
        server = GatewayServer(config)
    except ConfigError as error:  # a TLS or token file, the insecure rule
        logger.error("configuration error", extra={"error": str(error)})
        print(f"configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except ValueError as error:  # an OTEL_* setting tracing cannot use
        print(f"voxserve-http: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    runtime = runtime_metrics(server.metrics.registry)
    errors = ErrorCountingHandler(runtime.errors, SERVICE)
    logging.getLogger().addHandler(errors)
    endpoint: MetricsEndpoint | None = None
    try:
        if config.metrics_port >= 0:
            # HTTPS with the gateway's certificate (and client CA), like the services' endpoints
            endpoint = start_metrics_endpoint(
                server.metrics.registry, config.host, config.metrics_port, server.security.server
            )
        asyncio.run(_serve(server, endpoint, reload))
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


class _Reloader:
    """SIGHUP, as for the services: re-read the settings, apply the log levels, report the
    changed settings that need a restart. (The TLS files need no signal: they are re-read
    when they change.)"""

    def __init__(self, current: GatewayConfig, load: Callable[[], GatewayConfig]) -> None:
        self.current = current
        self.load = load
        self.levels = LogLevelControl()

    def __call__(self) -> None:
        try:
            new = self.load()
        except (SystemExit, Exception) as error:  # noqa: BLE001 - a bad file keeps the running settings
            logger.error("settings not reloaded; the running ones stay in force", extra={"error": str(error)})
            return
        self.levels.apply({"root": new.log_level, **new.library_levels()})
        fields = dataclasses.fields(new)
        changed = sorted(f.name for f in fields if getattr(new, f.name) != getattr(self.current, f.name))
        applied = [name for name in changed if name in RELOADABLE_SETTINGS]
        needs_restart = [name for name in changed if name not in RELOADABLE_SETTINGS]
        logger.info("settings reloaded", extra={"changed": changed, "applied": applied, "needs_restart": needs_restart})
        if needs_restart:
            logger.warning("some changed settings take effect only after a restart", extra={"settings": needs_restart})
        self.current = dataclasses.replace(self.current, **{name: getattr(new, name) for name in applied})


async def _serve(
    server: GatewayServer, endpoint: MetricsEndpoint | None, reload: Callable[[], GatewayConfig] | None = None
) -> None:
    """Serve; once uvicorn listens, log the start-up record (addresses, redacted settings);
    SIGHUP re-reads the settings with ``reload``."""
    config = server.config
    if reload is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _Reloader(config, reload))

    async def announce() -> None:
        while not server.started:
            if server.uvicorn.should_exit:
                return
            await asyncio.sleep(0.05)
        addresses = {server.scheme: f"{config.host}:{server.port}"}
        if endpoint is not None:
            addresses["metrics"] = f"{config.host}:{endpoint.port}"
        console = config.log_format == "console" or (config.log_format == "auto" and sys.stderr.isatty())
        log_startup(SERVICE, addresses, config, console=console)

    banner = asyncio.create_task(announce(), name="startup-record")
    try:
        await server.serve()
    finally:
        banner.cancel()


if __name__ == "__main__":
    main()
