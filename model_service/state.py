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

from model_service.paths import validate_model_id, validate_relative_file
from model_service.shape import BadShape, as_list, as_object, move_aside, read_json, typed
from voxserve_common.errors import InvalidArgument

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

    @classmethod
    def from_json(cls, value: object, where: str) -> FileRecord:
        """A file of a state.json record (untrusted): BadShape for a wrong type, a negative
        size or a path that could leave the model's directory."""
        data = as_object(value, where)
        path = typed(data, "path", str, where)
        try:
            validate_relative_file(path)
        except InvalidArgument as error:
            raise BadShape(f"{where}.path: {error}") from None
        size = typed(data, "size", int, where)
        if size < 0:
            raise BadShape(f"{where}.size: negative ({size})")
        return cls(
            path=path,
            size=size,
            sha256=typed(data, "sha256", str, where, ""),
            git_oid=typed(data, "git_oid", str, where, ""),
            required=typed(data, "required", bool, where, False),
        )


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
    def from_json(cls, value: object, where: str = "model") -> ModelRecord:
        """A record from state.json, which is untrusted: BadShape names the first field
        that is not of the type and form the store writes (ids and paths validated too)."""
        data = as_object(value, where)
        model_id = typed(data, "model_id", str, where)
        state = typed(data, "state", str, where, ModelState.NOT_DOWNLOADED.value)
        if state not in ModelState.__members__:
            raise BadShape(f"{where}.state: unknown state {state[:40]!r}")
        try:
            validate_model_id(model_id)
        except InvalidArgument as error:
            raise BadShape(f"{where}.model_id: {error}") from None
        files = as_list(data.get("files", []), f"{where}.files")
        return cls(
            model_id=model_id,
            state=ModelState(state),
            revision=typed(data, "revision", str, where, ""),
            requested_revision=typed(data, "requested_revision", str, where, ""),
            files=tuple(FileRecord.from_json(f, f"{where}.files[{i}]") for i, f in enumerate(files)),
            source=typed(data, "source", str, where, ""),
            error=typed(data, "error", str, where, ""),
            updated_at=typed(data, "updated_at", float, where, time.time()),
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace path with data so a crash leaves either the old or the new content.

    Raises OSError (disk full, read-only filesystem); the temp file is removed then, so
    a write that keeps failing on a full disk does not take what little space is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True)
class LoadedState:
    """What StateFile.load read; ``bad`` when the file was not all good (rewrite it at once)."""

    records: dict[str, ModelRecord]
    bad: bool = False


class StateFile:
    """state.json: every model record, rewritten atomically on each change."""

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> LoadedState:
        """Every readable record. state.json is untrusted: when it is unreadable or of the
        wrong shape it is moved aside (logged, naming it) and what it held is rebuilt from
        the disk by the start-up scan; records of the wrong shape are dropped (the scan
        rebuilds those models) and the good ones kept."""
        try:
            data = read_json(self.path)
        except FileNotFoundError:
            return LoadedState({})
        except (OSError, ValueError) as error:
            move_aside(self.path, "state file unreadable", str(error))
            return LoadedState({}, bad=True)
        try:
            document = as_object(data, "state.json")
            version = typed(document, "version", int, "state.json", self.VERSION)
            if version != self.VERSION:
                raise BadShape(f"state.json.version: {version}, this store reads version {self.VERSION}")
            items = as_list(document.get("models", []), "models")
        except BadShape as error:
            move_aside(self.path, "state file of the wrong shape", str(error))
            return LoadedState({}, bad=True)
        records: dict[str, ModelRecord] = {}
        problems: list[str] = []
        for index, item in enumerate(items):
            try:
                record = ModelRecord.from_json(item, f"models[{index}]")
            except BadShape as error:
                problems.append(str(error))
                continue
            records[record.model_id] = record
        if not problems:
            return LoadedState(records)
        problem = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        move_aside(self.path, "state file of the wrong shape", problem)
        return LoadedState(records, bad=True)

    def save(self, records: Iterable[ModelRecord]) -> None:
        """Write every record (fsync, rename, fsync the directory): slow, so never call it
        with a lock held that readers wait on."""
        payload = {
            "version": self.VERSION,
            "models": [r.to_json() for r in records if r.files or r.state != ModelState.NOT_DOWNLOADED],
        }
        atomic_write_bytes(self.path, json.dumps(payload, indent=1, sort_keys=True).encode())
