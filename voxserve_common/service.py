"""The entry-point life cycle both services share: logging, tracing, serve, clean up."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar, cast

from voxserve_common.banner import log_startup
from voxserve_common.config import ConfigError, ServiceSettings
from voxserve_common.errors import VoxserveError
from voxserve_common.logfiles import LogFileSettings
from voxserve_common.logs import configure_logging, stop_logging
from voxserve_common.redaction import Redactor
from voxserve_common.server import RunningServer, serve_until_signal
from voxserve_common.tls import TlsConfigError, read_token_file
from voxserve_common.tracing import setup_tracing, shutdown_tracing

logger = logging.getLogger(__name__)

# Settings SIGHUP applies without a restart; a change to any other one is reported as
# needing a restart.
RELOADABLE_SETTINGS = frozenset({"log_level", "log_levels"})


# Once the server has stopped, closing the domain objects, asyncio.run's teardown (on
# Python 3.11 it waits without a limit for every executor thread) and flushing the logs
# must end within this many seconds; past it the process prints every thread's stack and
# exits 1, so a stop never runs into the orchestrator's SIGKILL without a trace. A clean
# close takes 0.1-2 s (tests/common/test_exit_deadline.py, the podman test's logs). The
# interpreter's own finalization is not run at all: see exit_without_finalizing.
EXIT_DEADLINE_SECONDS = 10.0
EXIT_DEADLINE_STATUS = 1


def exit_without_finalizing(status: int) -> NoReturn:
    """End the process once everything of ours is closed and flushed, skipping the
    interpreter's finalization and the native libraries' exit-time destructors (grpc core,
    CTranslate2 and its OpenMP pool, onnxruntime, torch). They have nothing left to do for
    us, and one of them once hung a container stop past faulthandler's uninstall: no Python
    ran to dump a stack or fire the exit deadline, so only SIGKILL ended it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or gone: nothing reaches it
            stream.flush()
    os._exit(status)


class ExitDeadline:
    """A daemon timer that ends a process whose shutdown hangs, after dumping its threads."""

    def __init__(self, service: str, seconds: float = EXIT_DEADLINE_SECONDS) -> None:
        self.service = service
        self.seconds = seconds
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.name = "exit-deadline"

    def arm(self) -> ExitDeadline:
        self._timer.start()
        return self

    def _expire(self) -> None:
        # Logging may be stopped or be what hangs: write to the stderr file descriptor directly.
        record = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
            "level": "CRITICAL",
            "service": self.service,
            "message": f"shutdown did not finish within {self.seconds:g} s after the server stopped: "
            "exiting; every thread's stack follows",
        }
        try:
            os.write(2, (json.dumps(record) + "\n").encode())
            faulthandler.dump_traceback(file=2, all_threads=True)
        finally:
            os._exit(EXIT_DEADLINE_STATUS)


class ServiceApp(Protocol):
    @property
    def server(self) -> RunningServer: ...


C = TypeVar("C", bound=ServiceSettings)
A = TypeVar("A", bound=ServiceApp)


def redactor_for(config: ServiceSettings) -> Redactor:
    """A redactor that knows this config's secrets: secret-named settings and the tokens
    in its token files."""
    redactor = Redactor()
    redactor.add_secrets_of(config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name.endswith("token_file") and value:
            try:
                token = read_token_file(value)
            except TlsConfigError:
                continue  # the service reports the unreadable file itself
            if token:
                redactor.add_secret(token)
    return redactor


def setup_logging(service: str, config: ServiceSettings) -> None:
    files = LogFileSettings(
        directory=config.log_dir,
        max_bytes=config.log_max_bytes,
        rotate_when=config.log_rotate_when,
        backup_count=config.log_backup_count,
        retention_days=config.log_retention_days,
    )
    configure_logging(
        service,
        level=config.log_level,
        fmt=config.log_format,
        files=files,
        redactor=redactor_for(config),
        library_levels=config.library_levels(),
    )


class ReloadableSettings(Protocol):
    """An app that applies some of its own settings without a restart (SIGHUP)."""

    reloadable_settings: frozenset[str]

    def apply_reloadable_settings(self, new: Any) -> None: ...


def apply_reload(
    server: RunningServer, current: ServiceSettings, load: Callable[[], ServiceSettings], app: object = None
) -> ServiceSettings:
    """SIGHUP: re-read the settings; apply the log levels and the app's reloadable settings, report
    what needs a restart. Returns the settings now in force (the running ones, with the reloadable
    changes applied), which the next SIGHUP compares against."""
    try:
        new = load()
    except (SystemExit, Exception) as error:  # noqa: BLE001 - a bad file keeps the running settings
        logger.error("settings not reloaded; the running ones stay in force", extra={"error": str(error)})
        return current
    app_reloadable: frozenset[str] = getattr(app, "reloadable_settings", frozenset())
    changed = sorted(f.name for f in dataclasses.fields(current) if getattr(current, f.name) != getattr(new, f.name))
    applied = [name for name in changed if name in RELOADABLE_SETTINGS or name in app_reloadable]
    if app_reloadable and any(name in app_reloadable for name in changed):
        try:
            cast(ReloadableSettings, app).apply_reloadable_settings(new)
        except (VoxserveError, ValueError) as error:
            logger.error("settings not reloaded; the running ones stay in force", extra={"error": str(error)})
            return current
    server.log_levels.apply({"root": new.log_level, **new.library_levels()})
    needs_restart = [name for name in changed if name not in applied]
    logger.info("settings reloaded", extra={"changed": changed, "applied": applied, "needs_restart": needs_restart})
    if needs_restart:
        logger.warning("some changed settings take effect only after a restart", extra={"settings": needs_restart})
    return dataclasses.replace(current, **{name: getattr(new, name) for name in applied})


def run_service(
    *,
    service: str,
    program: str,
    config: C,
    start: Callable[[C], Awaitable[A]],
    close: Callable[[A], Any],
    reload: Callable[[], C] | None = None,
) -> NoReturn:
    """Configure logs and tracing, start the app, log the start-up record, serve until
    SIGTERM/SIGINT (SIGHUP re-reads the settings with ``reload``: log levels, and the
    settings an app that implements ``ReloadableSettings`` names), then close the domain objects
    and exit 0; a configuration error exits 2 and a start-up failure 1, with the reason on
    stderr."""
    setup_logging(service, config)
    setup_tracing(service)

    async def serve() -> None:
        app = await start(config)
        server = app.server
        addresses = {"grpc": f"{config.host}:{server.port}"}
        if server.metrics_endpoint is not None:
            addresses["metrics"] = f"{config.host}:{server.metrics_endpoint.port}"
        console = config.log_format == "console" or (config.log_format == "auto" and sys.stderr.isatty())
        log_startup(service, addresses, config, console=console)
        if reload is not None:
            in_force: list[ServiceSettings] = [config]

            def on_sighup() -> None:
                in_force[0] = apply_reload(server, in_force[0], reload, app)

            server.on_reload.append(on_sighup)
        try:
            await serve_until_signal(server, config.grace_seconds)
        finally:
            ExitDeadline(service).arm()
            await asyncio.to_thread(close, app)
            logger.info("service closed")  # what follows is tracing's and logging's flush, then exit

    status = 0
    try:
        asyncio.run(serve())
    except ConfigError as error:  # found when starting (a certificate, the tokens file, the bind)
        logger.error("configuration error", extra={"error": str(error)})
        print(f"configuration error: {error}", file=sys.stderr)
        status = 2
    except (VoxserveError, OSError) as error:
        logger.error("service failed", extra={"error": str(error)})
        print(f"{program}: {error}", file=sys.stderr)
        status = 1
    finally:
        shutdown_tracing()
        stop_logging()
    exit_without_finalizing(status)
