"""Log files rotated by size and by time, rotated files gzip-compressed, old ones pruned.

The handler runs on the logging listener thread (see voxserve_common.logs), so rotation
and compression never hold up an RPC or the event loop.
"""

from __future__ import annotations

import gzip
import logging
import logging.handlers
import os
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROTATE_INTERVALS = {"S": 1, "M": 60, "H": 3600, "D": 86400}
ROTATE_WHEN = ("", "midnight", *ROTATE_INTERVALS)
HOSTNAME = "{hostname}"


@dataclass(frozen=True)
class LogFileSettings:
    """Where and how the JSON log files are kept; ``directory`` None means no files.

    ``{hostname}`` in the directory becomes this host's name: replicas that share one log
    volume (docker-compose.yml's inference replicas) each write and rotate their own files.
    """

    directory: Path | None = None
    max_bytes: int = 50 << 20
    rotate_when: str = "midnight"  # "" (size only), "midnight" (UTC), "S", "M", "H", "D"
    backup_count: int = 14
    retention_days: float = 30.0

    def __post_init__(self) -> None:
        if self.directory is not None and HOSTNAME in str(self.directory):
            object.__setattr__(self, "directory", Path(str(self.directory).replace(HOSTNAME, socket.gethostname())))
        if self.rotate_when not in ROTATE_WHEN:
            raise ValueError(f"log_rotate_when must be one of {', '.join(repr(w) for w in ROTATE_WHEN)}")
        if self.max_bytes < 0 or self.backup_count < 0 or self.retention_days < 0:
            raise ValueError("log_max_bytes, log_backup_count and log_retention_days must be >= 0")


def next_rollover(now: float, when: str) -> float | None:
    """The time.time() at which a file opened at ``now`` rotates; None = never by time."""
    if not when:
        return None
    if when == "midnight":
        day = datetime.fromtimestamp(now, tz=UTC).date() + timedelta(days=1)
        return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    interval = ROTATE_INTERVALS[when]
    return (now // interval + 1) * interval


class RotatingLogFile(logging.handlers.BaseRotatingHandler):
    """``<name>.log`` rotated when it would pass max_bytes or when its period ends.

    Rotated files are named ``<name>.log.<UTC time>[.<n>].gz``; beyond ``backup_count`` of
    them, or older than ``retention_days``, the oldest are removed.
    """

    def __init__(self, path: Path, settings: LogFileSettings, level: int = logging.NOTSET) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(path), mode="a", encoding="utf-8", delay=False)
        self.setLevel(level)
        self.path = path
        self.settings = settings
        opened = path.stat().st_mtime if path.exists() and path.stat().st_size else time.time()
        self.rollover_at = next_rollover(opened, settings.rotate_when)

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self.rollover_at is not None and time.time() >= self.rollover_at:
            return True
        if self.settings.max_bytes and self.stream is not None:
            size = self.stream.tell()
            return size > 0 and size + len(self.format(record)) + 1 > self.settings.max_bytes
        return False

    def doRollover(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.path.exists() and self.path.stat().st_size:
            self._compress(self._rotated_name())
        self.prune()
        self.stream = self._open()
        self.rollover_at = next_rollover(time.time(), self.settings.rotate_when)

    def _rotated_name(self) -> Path:
        stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S")
        candidate = self.path.with_name(f"{self.path.name}.{stamp}.gz")
        counter = 1
        while candidate.exists():
            candidate = self.path.with_name(f"{self.path.name}.{stamp}.{counter}.gz")
            counter += 1
        return candidate

    def _compress(self, target: Path) -> None:
        moved = target.with_suffix(".rotating")
        os.replace(self.path, moved)
        with open(moved, "rb") as source, gzip.open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
        moved.unlink()

    def rotated_files(self) -> list[Path]:
        """Rotated files of this log, oldest first."""
        prefix = self.path.name + "."
        found = [p for p in self.path.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".gz")]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))

    def prune(self) -> None:
        """Remove rotated files beyond backup_count and those older than retention_days."""
        rotated = self.rotated_files()
        excess = len(rotated) - self.settings.backup_count
        cutoff = time.time() - self.settings.retention_days * 86400 if self.settings.retention_days else None
        for index, path in enumerate(rotated):
            if index < excess or (cutoff is not None and path.stat().st_mtime < cutoff):
                path.unlink(missing_ok=True)
