"""The bottom of the store: every model's record, its lock, directories, state.json and views.

data_dir/state.json          every model's record, replaced atomically
data_dir/models/<id>/...     verified files only (moved in after their hash checks)
data_dir/partial/<id>/...    <file>.part + <file>.part.json while downloading (resumable)
data_dir/staging/...         imports being copied
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from model_service.catalog import Catalog
from model_service.errors import UnsafePath
from model_service.events import EventBus, EventType, StoreEvent
from model_service.metrics import ModelStoreMetrics
from model_service.paths import safe_join
from model_service.state import BUSY_STATES, FileRecord, ModelRecord, ModelState, StateFile
from model_service.store.persistence import StateWrites
from model_service.store.progress import DownloadProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileView:
    path: str
    size: int
    sha256: str
    required: bool
    present: bool


@dataclass(frozen=True)
class ModelView:
    """An immutable copy of one model's state for the edge to encode."""

    model_id: str
    kind: str
    repo_id: str
    revision: str
    requested_revision: str
    state: ModelState
    size_bytes: int
    local_path: str
    files: tuple[FileView, ...]
    source: str
    error: str
    updated_at: float
    bytes_on_disk: int
    queue_position: int
    description: str


@dataclass
class _Model:
    """Everything the store holds about one model, in one place."""

    record: ModelRecord
    readers: int = 0  # open FileReader holds: DeleteModel and ImportModel refuse while > 0
    progress: DownloadProgress | None = None  # set while a download moves bytes


class ModelRegistry:
    """Owns the records and the one lock that orders their changes with their events.

    Thread safety: every method may be called from any thread. ``view``, ``snapshot``,
    ``record`` and ``readers`` hold the lock only to copy immutable records (file stats run
    after it is released), so they are safe to call on the event loop. ``transition`` and
    ``locked`` write state.json (fsync) *after* releasing the lock, in the calling thread,
    and are not for the event loop.
    """

    def __init__(self, data_dir: Path, catalog: Catalog, bus: EventBus, metrics: ModelStoreMetrics) -> None:
        self.catalog = catalog
        self.bus = bus
        self.metrics = metrics
        self.data_dir = data_dir.resolve()
        self.models_dir = self.data_dir / "models"
        self.partial_dir = self.data_dir / "partial"
        self.staging_dir = self.data_dir / "staging"
        for directory in (self.data_dir, self.models_dir, self.partial_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._state_file = StateFile(self.data_dir / "state.json")
        # Failed writes of state.json (and queue.json, through the download service) are
        # retried there; while one fails the store is not ready (see ModelStore.writable).
        self.writes = StateWrites(self.data_dir)
        self._lock = threading.RLock()
        self._depth = 0  # nesting of locked() in the owning thread: state.json is written at 0
        self._models: dict[str, _Model] = {}
        self._version = 0  # bumped by every persisted change, under _lock
        # Writers of state.json take turns here (never while holding _lock); the version
        # written last only grows, so an older snapshot never replaces a newer one.
        self._persist_lock = threading.Lock()
        self._saved_version = 0
        self._after_unlock: list[Callable[[], None]] = []  # run when the outermost locked() ends

    # ----------------------------------------------------------------- directories

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / model_id

    def partial_root(self, model_id: str) -> Path:
        return self.partial_dir / model_id

    # ----------------------------------------------------------------- locking and persistence

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the lock for a check-then-transition; state.json is written once the
        outermost ``locked()`` of this thread releases it."""
        outermost = False
        try:
            with self._lock:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                    outermost = self._depth == 0
        finally:
            if outermost:
                self._persist()
                with self._lock:
                    callbacks, self._after_unlock = self._after_unlock, []
                for callback in callbacks:
                    callback()

    def after_unlock(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (disk work, e.g. an fsync) once this thread's outermost
        ``locked()`` has released the lock; at once when it holds none."""
        with self._lock:
            if self._depth > 0:  # held by this thread (the lock is reentrant, others wait above)
                self._after_unlock.append(callback)
                return
        callback()

    def _persist(self) -> None:
        """Write state.json if a change is not in it yet. Never raises for the disk: a
        failed write is logged and retried by ``writes`` (this method again)."""
        with self._persist_lock:
            with self._lock:
                version = self._version
                if version <= self._saved_version:
                    return
                records = [m.record for m in self._models.values()]
            if self.writes.write("state.json", lambda: self._state_file.save(records), retry=self._persist):
                self._saved_version = version

    def restore(self) -> None:
        """Load state.json for every catalog model; a download that died with the last
        process is INCOMPLETE now (state.json is rewritten at once so it never says it runs).
        PAUSED stays PAUSED: its partial files wait for ResumeDownload. A state.json that
        was moved aside (unreadable, wrong shape) is rewritten at once with what was good."""
        loaded = self._state_file.load()
        with self.locked():
            if loaded.bad:
                self._version += 1  # a state.json of the good records only, at once
            for entry in self.catalog:
                record = loaded.records.get(entry.model_id) or ModelRecord(
                    entry.model_id, requested_revision=entry.revision
                )
                if record.state in BUSY_STATES:
                    record = replace(record, state=ModelState.INCOMPLETE)
                    self._version += 1
                self._models[entry.model_id] = _Model(replace(record, queue_position=0))

    # ----------------------------------------------------------------- changes

    def transition(
        self,
        model_id: str,
        state: ModelState,
        *,
        message: str = "",
        files: Sequence[FileRecord] | None = None,
        revision: str | None = None,
        requested_revision: str | None = None,
        source: str | None = None,
        error: str | None = None,
        queue_position: int | None = None,
        persist: bool = True,
    ) -> ModelRecord:
        """Replace a record (fields given as None keep their value), publish STATE_CHANGED
        and, when ``persist``, write state.json after the lock is released.

        ``queue_position`` is kept only while WAITING. Raises KeyError for unknown ids.
        """
        with self.locked():
            old = self._models[model_id].record
            if state != ModelState.WAITING:
                position = 0
            else:
                position = old.queue_position if queue_position is None else queue_position
            record = replace(
                old,
                state=state,
                files=old.files if files is None else tuple(files),
                revision=old.revision if revision is None else revision,
                requested_revision=old.requested_revision if requested_revision is None else requested_revision,
                source=old.source if source is None else source,
                error=old.error if error is None else error,
                queue_position=position,
                updated_at=time.time(),
            )
            self._models[model_id].record = record
            if persist:
                self._version += 1
            self.bus.publish(_state_event(record, message, self._models[model_id].progress))
            self._refresh_state_gauge()
        return record

    def set_progress(self, model_id: str, progress: DownloadProgress | None) -> None:
        """Attach the live counts of a running download (None when it ends); views show them."""
        with self._lock:
            self._models[model_id].progress = progress

    def add_reader(self, model_id: str) -> None:
        """Count an open file stream. Call inside ``locked()`` after checking the state."""
        with self._lock:
            self._models[model_id].readers += 1

    def remove_reader(self, model_id: str) -> None:
        with self._lock:
            self._models[model_id].readers -= 1

    # ----------------------------------------------------------------- reads

    def record(self, model_id: str) -> ModelRecord:
        """The current record (immutable); KeyError for ids outside the catalog."""
        with self._lock:
            return self._models[model_id].record

    def records(self) -> dict[str, ModelRecord]:
        with self._lock:
            return {model_id: m.record for model_id, m in self._models.items()}

    def readers(self, model_id: str) -> int:
        with self._lock:
            return self._models[model_id].readers

    def view(self, model_id: str) -> ModelView:
        self.catalog.get(model_id)
        with self._lock:
            model = self._models[model_id]
            record, live = model.record, model.progress
            bytes_done = live.bytes_done if live is not None else None
        return self._build_view(record, bytes_done)

    def snapshot(self, model_ids: set[str] | None = None) -> tuple[list[ModelView], int]:
        """Views of the catalog's models (all, or those in ``model_ids``) and the event
        sequence they correspond to: records and sequence are read under one lock."""
        with self._lock:
            taken = []
            for entry in self.catalog:
                if model_ids and entry.model_id not in model_ids:
                    continue
                model = self._models[entry.model_id]
                taken.append((model.record, model.progress.bytes_done if model.progress is not None else None))
            sequence = self.bus.sequence
        return [self._build_view(record, done) for record, done in taken], sequence

    def _build_view(self, record: ModelRecord, bytes_done: int | None) -> ModelView:
        entry = self.catalog.get(record.model_id)
        model_dir = self.model_dir(record.model_id)
        files = []
        on_disk = 0
        for f in record.files:
            try:
                path = safe_join(model_dir, f.path)
                size = path.stat().st_size if path.is_file() else -1
            except (OSError, UnsafePath):
                size = -1
            on_disk += max(size, 0)
            files.append(FileView(f.path, f.size, f.sha256, f.required, size == f.size))
        if record.state == ModelState.PAUSED and bytes_done is None:
            on_disk += self._partial_bytes(record.model_id)
        has_files = record.state in (ModelState.READY, ModelState.INCOMPLETE)
        return ModelView(
            model_id=record.model_id,
            kind=entry.kind,
            repo_id=entry.repo_id,
            revision=record.revision or entry.revision,
            requested_revision=record.requested_revision or entry.revision,
            state=record.state,
            size_bytes=record.size_bytes,
            local_path=str(model_dir) if has_files else "",
            files=tuple(files),
            source=record.source,
            error=record.error,
            updated_at=record.updated_at,
            bytes_on_disk=on_disk if bytes_done is None else bytes_done,
            queue_position=record.queue_position,
            description=entry.description,
        )

    def _partial_bytes(self, model_id: str) -> int:
        """Bytes in a model's ``.part`` files (a paused download's progress)."""
        total = 0
        root = self.partial_root(model_id)
        with contextlib.suppress(OSError):
            for part in root.rglob("*.part"):
                with contextlib.suppress(OSError):
                    if not part.is_symlink():
                        total += part.stat().st_size
        return total

    # ----------------------------------------------------------------- gauges

    def _refresh_state_gauge(self) -> None:
        counts = dict.fromkeys(ModelState, 0)
        for model in self._models.values():
            counts[model.record.state] += 1
        for state, count in counts.items():
            self.metrics.models_by_state.labels(state.value).set(count)

    def refresh_gauges(self) -> None:
        """Models by state, bytes on disk per model and free disk space."""
        with self._lock:
            self._refresh_state_gauge()
            records = [m.record for m in self._models.values()]
        for record in records:
            if record.state == ModelState.READY:
                self.metrics.model_disk_bytes.labels(record.model_id).set(record.size_bytes)
            elif record.state == ModelState.NOT_DOWNLOADED:
                self.metrics.model_disk_bytes.labels(record.model_id).set(0)
        with contextlib.suppress(OSError):
            self.metrics.disk_free_bytes.set(shutil.disk_usage(self.data_dir).free)


def _state_event(record: ModelRecord, message: str, progress: DownloadProgress | None) -> StoreEvent:
    """A STATE_CHANGED event; during a download it carries the download's counts, so a
    progress bar fed by the stream never goes back (VERIFYING and READY keep the totals)."""
    verify_done = verify_total = 0
    if progress is not None:
        bytes_done, files_done = progress.bytes_done, progress.files_done
        if record.state == ModelState.VERIFYING:
            verify_done, verify_total = progress.verify_bytes_done, progress.verify_bytes_total
    elif record.state == ModelState.READY:
        bytes_done, files_done = record.size_bytes, len(record.files)
    else:
        bytes_done, files_done = 0, 0
    return StoreEvent(
        0,
        record.model_id,
        EventType.STATE_CHANGED,
        record.state,
        record.updated_at,
        bytes_total=record.size_bytes,
        bytes_done=bytes_done,
        files_done=files_done,
        files_total=len(record.files),
        source=record.source,
        queue_position=record.queue_position,
        message=message,
        verify_bytes_done=verify_done,
        verify_bytes_total=verify_total,
    )
