"""Per-model records and their crash-safe persistence (write temp, fsync, rename)."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class ModelState(enum.StrEnum):
    NOT_DOWNLOADED = "NOT_DOWNLOADED"
    WAITING = "WAITING"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    READY = "READY"
    INCOMPLETE = "INCOMPLETE"
    ERROR = "ERROR"
    PAUSED = "PAUSED"  # PauseDownload stopped it; partial files kept; no queue slot


BUSY_STATES = frozenset({ModelState.WAITING, ModelState.DOWNLOADING, ModelState.VERIFYING})


@dataclass(frozen=True)
class FileRecord:
    """A file the model needs: expected size and hashes (sha256 when the hub gives one)."""

    path: str
    size: int
    sha256: str = ""
    git_oid: str = ""
    required: bool = False


@dataclass(frozen=True)
class ModelRecord:
    """What the store knows about one model; persisted in state.json.

    Immutable: a change is a new record (``dataclasses.replace``), so a record read under
    the registry lock can be used, and written to state.json, after the lock is released.
    """

    model_id: str
    state: ModelState = ModelState.NOT_DOWNLOADED
    revision: str = ""  # resolved commit (or "local" for imports)
    requested_revision: str = ""
    files: tuple[FileRecord, ...] = ()
    source: str = ""
    error: str = ""
    updated_at: float = field(default_factory=time.time)
    queue_position: int = 0

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["files"] = [asdict(f) for f in self.files]
        data.pop("queue_position")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        files = tuple(FileRecord(**f) for f in data.get("files", []))
        return cls(
            model_id=data["model_id"],
            state=ModelState(data.get("state", "NOT_DOWNLOADED")),
            revision=data.get("revision", ""),
            requested_revision=data.get("requested_revision", ""),
            files=files,
            source=data.get("source", ""),
            error=data.get("error", ""),
            updated_at=float(data.get("updated_at", time.time())),
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace path with data so a crash leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class StateFile:
    """state.json: every model record, rewritten atomically on each change."""

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, ModelRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            broken = self.path.with_suffix(f".broken-{int(time.time())}")
            logger.error(
                "state file unreadable; moved aside, disk scan will rebuild state",
                extra={"error": str(exc), "moved_to": str(broken)},
            )
            with contextlib.suppress(OSError):
                os.replace(self.path, broken)
            return {}
        records = {}
        for item in data.get("models", []):
            try:
                record = ModelRecord.from_json(item)
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("skipping unreadable model record", extra={"error": str(exc)})
                continue
            records[record.model_id] = record
        return records

    def save(self, records: Iterable[ModelRecord]) -> None:
        """Write every record (fsync, rename, fsync the directory): slow, so never call it
        with a lock held that readers wait on."""
        payload = {
            "version": self.VERSION,
            "models": [r.to_json() for r in records if r.files or r.state != ModelState.NOT_DOWNLOADED],
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=1, sort_keys=True).encode())
