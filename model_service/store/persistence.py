"""Writes of the store's state files (state.json, queue.json) that never fail the work asking for them."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from voxserve_common.errors import FailedPrecondition

logger = logging.getLogger(__name__)

# How often a state file that could not be written is tried again. Writing state.json takes
# a few milliseconds (one small file, fsync, rename), so trying every 2 s costs nothing while
# the disk is full, and readiness is back within 2 s of space coming back.
RETRY_SECONDS = 2.0


class StateWrites:
    """Runs the writes of the state files; one that fails (disk full, read-only or broken
    filesystem) is logged, not raised, and tried again every RETRY_SECONDS in a background
    thread until it succeeds.

    While any is failing, ``healthy`` is False: the store keeps serving from memory, but a
    restart would not find what changed, so its readiness is NOT_SERVING (listeners hear
    every change of ``healthy``). Thread safe.
    """

    def __init__(self, data_dir: Path, retry_seconds: float = RETRY_SECONDS) -> None:
        self.data_dir = data_dir
        self.retry_seconds = retry_seconds
        self._lock = threading.Lock()
        self._failing: dict[str, Callable[[], None]] = {}  # file name -> what writes it again
        self._listeners: list[Callable[[bool], None]] = []
        self._closed = threading.Event()
        self._retrier: threading.Thread | None = None

    @property
    def healthy(self) -> bool:
        with self._lock:
            return not self._failing

    def failing(self) -> list[str]:
        with self._lock:
            return sorted(self._failing)

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(healthy)`` (from the writing thread) each time ``healthy`` changes."""
        with self._lock:
            self._listeners.append(listener)

    def write(self, name: str, save: Callable[[], None], retry: Callable[[], None] | None) -> bool:
        """Run ``save()``; True when it wrote. On OSError log it and, unless ``retry`` is None,
        call ``retry()`` later until a write of ``name`` succeeds (``retry`` must write the
        state as it is then, and come back here)."""
        try:
            save()
        except OSError as error:
            self._failed(name, error, retry)
            return False
        self._written(name)
        return True

    def close(self) -> None:
        """Stop retrying after one last try of every failing write (a graceful stop after
        space came back keeps what changed)."""
        for retry in self._pending():
            self._call(retry)
        self._closed.set()
        with self._lock:
            retrier = self._retrier
        if retrier is not None:
            retrier.join(5)

    def _failed(self, name: str, error: OSError, retry: Callable[[], None] | None) -> None:
        with self._lock:
            first = name not in self._failing
            was_healthy = not self._failing
            if retry is not None:
                self._failing[name] = retry
            if retry is not None and self._retrier is None and not self._closed.is_set():
                self._retrier = threading.Thread(target=self._retry_loop, name="state-write-retry", daemon=True)
                self._retrier.start()
            listeners = list(self._listeners) if was_healthy and self._failing else []
        if first:
            logger.error(
                "state file cannot be written; retrying" if retry else "state file cannot be written",
                extra={
                    "file": str(self.data_dir / name),
                    "error": str(error),
                    "free_bytes": _free_bytes(self.data_dir),
                    "retry_seconds": self.retry_seconds if retry else None,
                    # voxserve_errors_total: a condition for an operator to fix, not a bug
                    "error_category": FailedPrecondition.__name__,
                },
            )
        for listener in listeners:
            listener(False)

    def _written(self, name: str) -> None:
        with self._lock:
            if name not in self._failing:
                return
            del self._failing[name]
            listeners = list(self._listeners) if not self._failing else []
        logger.info("state file written again", extra={"file": str(self.data_dir / name)})
        for listener in listeners:
            listener(True)

    def _pending(self) -> list[Callable[[], None]]:
        with self._lock:
            return list(self._failing.values())

    def _retry_loop(self) -> None:
        while not self._closed.wait(self.retry_seconds):
            with self._lock:
                pending = list(self._failing.values())
                if not pending:  # decided under the lock: a new failure starts a new thread
                    self._retrier = None
                    return
            for retry in pending:
                self._call(retry)

    @staticmethod
    def _call(retry: Callable[[], None]) -> None:
        try:
            retry()
        except Exception:  # a bug in a writer must not end the retries of the others
            logger.exception("retrying a state file write failed")


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
