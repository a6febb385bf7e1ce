"""One store per data dir: an exclusive flock on ``data_dir/store.lock`` for the process's life."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

from voxserve_common.config import ConfigError

logger = logging.getLogger(__name__)

LOCK_NAME = "store.lock"


class DataDirInUse(ConfigError):
    """Another process holds the data dir's lock: two stores would append to the same
    partial files and overwrite each other's state.json. A ConfigError: the process exits 2."""


class DataDirLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``store.lock``, which records the holder (pid and host).

    The kernel drops the lock when the process ends however it ends, so a crash never
    leaves a stale lock; the file itself stays (deleting it would let a third store lock a
    new file while the second still holds the old one). flock works across containers
    sharing the volume on one host; on NFS it is emulated with POSIX locks by Linux.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirInUse naming the directory and the holder."""
        handle = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by another model store ({holder}, lock file {self.path}); "
                "stop that store, or give this one its own --data-dir (VOXSERVE_DATA_DIR)"
            ) from None
        except BaseException:
            handle.close()
            raise
        with contextlib.suppress(OSError):  # a full disk must not stop the store that holds the lock
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()} {socket.gethostname()}\n")
            handle.flush()
        self._handle = handle
        logger.debug("data dir locked", extra={"lock_file": str(self.path)})

    def release(self) -> None:
        if self._handle is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def _holder(handle: IO[str]) -> str:
    """'pid 123 on host' from the lock file (untrusted: written by whoever holds it)."""
    try:
        handle.seek(0)
        words = handle.read(200).split()
    except (OSError, ValueError):
        words = []
    if words and words[0].isdigit():
        host = f" on {words[1]}" if len(words) > 1 and words[1].isprintable() else ""
        return f"pid {words[0]}{host}"
    return "a process that has not recorded its pid yet"
