"""ImportModel: copy a model from a directory on this host (or its embedded copy), hashing as it copies."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.util.types import AttributeValue

from model_service.catalog import CatalogEntry
from model_service.errors import DISK_FULL_ERRNOS, DiskFull, ImportFailed, ModelBusy, UnsafePath
from model_service.paths import remove_path, safe_join, validate_relative_file
from model_service.spans import IMPORT, WorkSpans
from model_service.state import BUSY_STATES, FileRecord, ModelState, fsync_dir
from model_service.store.progress import DownloadProgress, VerifyReporter
from model_service.store.registry import ModelRegistry, ModelView
from model_service.validator import FileHasher
from voxserve_common.errors import InvalidArgument, PermissionDenied, ResourceExhausted, VoxserveError

logger = logging.getLogger(__name__)

COPY_BLOCK = 4 << 20


class Importer:
    """Imports into staging/, then swaps the model directory in; READY only when complete.

    Blocking (copies and fsyncs whole models): call from a worker thread.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        is_downloading: Callable[[str], bool],
        limits: ImportLimits | None = None,
        on_imported: Callable[[str], None] = lambda model_id: None,
        spans: WorkSpans | None = None,
        copy_block: int = COPY_BLOCK,
    ) -> None:
        self.registry = registry
        self._is_downloading = is_downloading
        self.limits = limits or ImportLimits()
        # After a successful import: drop what a paused pull left (its request in queue.json).
        self._on_imported = on_imported
        self.spans = spans or WorkSpans()
        self.copy_block = copy_block  # also the step of its verification progress

    def import_model(self, model_id: str, source_dir: str) -> ModelView:
        """Copy ``source_dir`` (absolute, on this host; empty: the embedded copy), hashing
        as it copies (VERIFYING progress events: verify_bytes_done/total over the bytes
        copied); a PAUSED model's pause request and partial files go once it is READY.

        Raises ImportFailed for a bad source (not a directory, symlinks, required files
        missing or empty), ModelBusy while the model downloads or is being fetched.
        """
        entry = self.registry.catalog.get(model_id)
        sources, origin = self._sources(entry, source_dir)
        missing = [name for name in entry.required_files if name not in sources or sources[name].stat().st_size == 0]
        if missing:
            raise ImportFailed(
                f"cannot import {model_id}: required files missing or empty in {source_dir or 'the embedded copy'}: {missing}"
            )
        registry = self.registry
        total = sum(path.stat().st_size for path in sources.values())
        progress = DownloadProgress(total, 0, len(sources), source=origin)
        verify = VerifyReporter(model_id, progress, registry.bus)
        verify.start(total)
        with registry.locked():
            record = registry.record(model_id)
            if record.state in BUSY_STATES or self._is_downloading(model_id):
                raise ModelBusy(f"{model_id} is {record.state.value}; cancel the download before importing")
            if registry.readers(model_id):
                raise ModelBusy(f"{model_id} is being copied by FetchModelFiles; retry when it ends")
            previous = record.state
            registry.set_progress(model_id, progress)
            registry.transition(model_id, ModelState.VERIFYING, message=f"importing from {origin}", persist=False)
        staging = registry.staging_dir / f"{model_id}-{uuid.uuid4().hex[:8]}"

        def copied(count: int) -> None:  # the copy is the import's transfer and its hashing
            progress.bytes_done += count
            verify.on_bytes(count)

        attributes: dict[str, AttributeValue] = {
            "voxserve.model_id": model_id,
            "voxserve.files": len(sources),
            "voxserve.bytes": total,
        }
        try:
            with self.spans.span(IMPORT, attributes):
                files = _copy_files(sources, staging, set(entry.required_files), copied, verify, self.copy_block)
                verify.publish(force=True)  # the last one says done == total
                self._swap_in(model_id, staging, files, origin)
        except Exception as error:
            remove_path(staging)
            registry.set_progress(model_id, None)
            registry.transition(
                model_id,
                previous if previous not in BUSY_STATES else ModelState.NOT_DOWNLOADED,
                message=f"import failed: {error}",
            )
            if isinstance(error, VoxserveError):
                raise
            if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
                try:
                    free = shutil.disk_usage(registry.data_dir).free
                except OSError:
                    free = 0
                doing = f"importing {model_id} from {origin}"
                raise DiskFull(str(registry.data_dir), free, total, doing, again="import") from error
            raise ImportFailed(f"import of {model_id} from {origin} failed: {error}") from error
        self._on_imported(model_id)
        logger.info("model imported", extra={"model_id": model_id, "source": origin, "files": len(files)})
        return registry.view(model_id)

    def import_embedded(self) -> None:
        """Import every catalog model that ships an embedded copy and is not READY."""
        for entry in self.registry.catalog:
            if not entry.embedded_files or self.registry.record(entry.model_id).state == ModelState.READY:
                continue
            try:
                self.import_model(entry.model_id, "")
            except VoxserveError as error:
                logger.warning("embedded import failed", extra={"model_id": entry.model_id, "error": str(error)})

    def _sources(self, entry: CatalogEntry, source_dir: str) -> tuple[Mapping[str, Path], str]:
        if source_dir:
            root = self.limits.confine(source_dir)
            if not root.is_dir():
                raise ImportFailed(f"source_dir {source_dir!r} is not a directory on the store's host")
            sources = _scan_import_dir(entry, root, self.limits)
            self.limits.check_size(entry.model_id, sources)
            return sources, f"import:{root}"
        if not entry.embedded_files:
            raise InvalidArgument(
                f"{entry.model_id} has no embedded copy; give source_dir (a directory on the store's host)"
            )
        return dict(entry.embedded_files), "embedded"

    def _swap_in(self, model_id: str, staging: Path, files: list[FileRecord], origin: str) -> None:
        registry = self.registry
        model_dir = registry.model_dir(model_id)
        trash = registry.staging_dir / f"trash-{model_id}-{uuid.uuid4().hex[:8]}"
        # The model is VERIFYING, so no reader can open it and DeleteModel refuses: the
        # swap needs no lock (and its fsync must not hold one that get_model waits on).
        if model_dir.exists():
            os.replace(model_dir, trash)
        os.replace(staging, model_dir)
        fsync_dir(registry.models_dir)
        registry.set_progress(model_id, None)
        registry.transition(
            model_id,
            ModelState.READY,
            message=f"imported from {origin}",
            files=files,
            revision="local",
            requested_revision="local",
            source=origin,
            error="",
        )
        remove_path(trash)
        remove_path(registry.partial_root(model_id))


def _copy_files(
    sources: Mapping[str, Path],
    staging: Path,
    required: set[str],
    on_bytes: Callable[[int], None],
    verify: VerifyReporter,
    block_size: int,
) -> list[FileRecord]:
    files = []
    for relative, source in sorted(sources.items()):
        target = safe_join(staging, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        hasher = FileHasher(source.stat().st_size)
        verify.file(relative)
        with open(source, "rb") as src, open(target, "wb") as dst:
            while block := src.read(block_size):
                dst.write(block)
                hasher.update(block)
                on_bytes(len(block))
            dst.flush()
            os.fsync(dst.fileno())
        verify.progress.files_done += 1
        files.append(
            FileRecord(
                relative, hasher.size, hasher.sha256.hexdigest(), hasher.git_sha1.hexdigest(), relative in required
            )
        )
    return files


@dataclass(frozen=True)
class ImportLimits:
    """Where ImportModel may read (``roots``; none = only the embedded copies) and how much."""

    roots: tuple[Path, ...] = ()
    max_bytes: int = 64 << 30
    max_files: int = 1_000

    def confine(self, source_dir: str) -> Path:
        """The resolved source_dir if it lies inside a root (symlinks resolved first).

        Raises InvalidArgument for a relative path and PermissionDenied otherwise, with a
        message that is the same whether or not the path exists on the host.
        """
        if "\x00" in source_dir or len(source_dir) > 4096:
            raise InvalidArgument("source_dir must be an absolute path of at most 4096 characters")
        given = Path(source_dir)
        if not given.is_absolute():
            raise ImportFailed(f"source_dir must be an absolute path on the store's host, not {source_dir[:200]!r}")
        resolved = given.resolve(strict=False)
        for root in self.roots:
            if resolved.is_relative_to(root.resolve(strict=False)):
                return resolved
        raise PermissionDenied(
            "source_dir is not inside the directories this store may import from (the import_roots setting); "
            "ask its operator to add it, or import the embedded copy with an empty source_dir"
        )

    def check_size(self, model_id: str, sources: Mapping[str, Path]) -> None:
        total = sum(path.stat().st_size for path in sources.values())
        if total > self.max_bytes:
            raise ResourceExhausted(
                f"cannot import {model_id}: its files hold {total} bytes, over the import limit of "
                f"{self.max_bytes} bytes (max_import_bytes)"
            )


def _scan_import_dir(entry: CatalogEntry, root: Path, limits: ImportLimits) -> dict[str, Path]:
    sources: dict[str, Path] = {}
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        seen += len(dirnames) + len(filenames)
        if seen > limits.max_files * 10:  # a huge tree is not a model: stop walking it
            raise ResourceExhausted(
                f"source_dir holds more than {limits.max_files * 10} entries; point it at the model's own directory"
            )
        current = Path(dirpath)
        for name in dirnames:
            if (current / name).is_symlink():
                raise ImportFailed(f"refusing to import: {current / name} is a symlink")
        for name in filenames:
            path = current / name
            relative = path.relative_to(root).as_posix()
            if not entry.allows(relative):
                continue
            if path.is_symlink():
                raise ImportFailed(f"refusing to import: {path} is a symlink")
            try:
                validate_relative_file(relative)
            except UnsafePath as error:
                raise ImportFailed(f"refusing to import {relative!r}: {error}") from None
            sources[relative] = path
            if len(sources) > limits.max_files:
                raise ResourceExhausted(
                    f"cannot import {entry.model_id}: more than {limits.max_files} matching files (max_import_files)"
                )
    if not sources:
        raise ImportFailed(f"{root} holds no files matching {list(entry.allow_patterns)} for {entry.model_id}")
    return sources
