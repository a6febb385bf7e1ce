"""The inference service's own copies of models in cache_dir: written durably, checked against the store's manifest, swept.

A copy is ``cache_dir/<model_id>/<revision>/`` holding every file of the store's manifest and
``.voxserve-manifest.json`` (that manifest: path -> [size, sha256]). It is written under
``cache_dir/.staging/``, every file and directory fsynced, then renamed in whole: a copy the
rename made is complete even after a power cut, and a half-copy a killed process left in
``.staging`` is removed at the next start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, NoReturn

from inference_service.errors import ModelFilesMissing, ModelFilesUnloadable, ModelLoadFailed
from inference_service.model_cache import LoadedModel, ModelSpec
from voxserve_common.errors import DataLoss, VoxserveError

logger = logging.getLogger(__name__)

STAGING = ".staging"
MARKER = ".voxserve-manifest.json"
HASH_BLOCK = 1 << 20

# path -> (size, sha256 hex; "" when the store knows none)
Manifest = Mapping[str, tuple[int, str]]


class ModelCopies:
    """The copies under one cache directory (one inference service's own: the start-up sweep
    removes every half-copy in it)."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir

    def target(self, model_id: str, revision: str) -> Path:
        safe = "".join(c for c in (revision or "local") if c.isalnum())[:40] or "local"
        return self.root / model_id / safe

    def owns(self, path: Path) -> bool:
        """True for a copy directory of this cache (not the store's own directory in shared mode)."""
        root = self.root.resolve()
        resolved = Path(path).resolve()
        return resolved.is_relative_to(root) and not resolved.is_relative_to(root / STAGING)

    def sweep_staging(self) -> None:
        """Remove the half-copies that fetches killed with their process left (call at start-up,
        before any fetch). A failure is logged, not raised: the service starts without the sweep."""
        staging = self.root / STAGING
        try:
            entries = list(staging.iterdir()) if staging.is_dir() else []
            size = sum(f.stat().st_size for entry in entries for f in _files(entry))
            for entry in entries:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
        except OSError as error:
            logger.warning(
                "could not remove the half-copies of models in the cache directory; remove them by hand",
                extra={"path": str(staging), "error": str(error)},
            )
            return
        if entries:
            logger.info(
                "removed half-copies of models left by an earlier run",
                extra={"path": str(staging), "copies": len(entries), "bytes": size},
            )

    def is_current(self, target: Path, manifest: Manifest) -> bool:
        """True when ``target`` is a complete copy of ``manifest`` whose files have the right
        sizes (a cheap check at each load; the sha256 check runs when a load fails)."""
        recorded = read_marker(target)
        if recorded is None or recorded != dict(manifest):
            return False
        problems = size_problems(target, manifest)
        if problems:
            logger.warning(
                "cached model copy damaged; copying it again",
                extra={"path": str(target), "problems": problems[:5]},
            )
        return not problems

    def verify(self, target: Path) -> list[str]:
        """What is wrong with a copy against the manifest it was made from (sizes, then sha256 of
        the files whose size is right); empty when intact."""
        manifest = read_marker(target)
        if manifest is None:
            return [f"{MARKER} is missing or unreadable"]
        problems = []
        for name, (size, expected) in sorted(manifest.items()):
            path = target / name
            try:
                actual_size = path.stat().st_size
                if actual_size != size:
                    problems.append(f"{name}: {actual_size} bytes, expected {size}")
                elif expected and (actual := file_sha256(path)) != expected:
                    problems.append(f"{name}: sha256 {actual}, expected {expected}")
            except OSError as error:
                problems.append(f"{name}: {error.strerror or error}")
        return problems

    def discard(self, target: Path) -> None:
        """Make ``target`` incomplete (its marker removed first), so the next fetch copies it again."""
        (target / MARKER).unlink(missing_ok=True)
        _fsync_dir(target)
        shutil.rmtree(target, ignore_errors=True)

    def stage(self, model_id: str, manifest: Manifest) -> StagedCopy:
        staging = self.root / STAGING / f"{model_id}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        _fsync_dir(staging.parent)
        return StagedCopy(model_id, staging, manifest)

    def install(self, staged: StagedCopy, target: Path) -> None:
        """Make a verified staged copy the model's copy: its marker written last, every file and
        directory fsynced, then one rename (and the parent fsynced so the rename lasts)."""
        marker = staged.path / MARKER
        with open(marker, "w") as handle:
            json.dump(staged.manifest_json(), handle, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        for directory in sorted({p.parent for p in staged.path.rglob("*")}, reverse=True):
            _fsync_dir(directory)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        _fsync_dir(target.parent)
        _fsync_dir(self.root)


class StagedCopy:
    """One copy being written into ``.staging``: each file's chunks in order, hashed as they are
    written; ``finish`` checks sizes and sha256 against the manifest and fsyncs every file."""

    def __init__(self, model_id: str, path: Path, manifest: Manifest) -> None:
        self.model_id = model_id
        self.path = path
        self.manifest = manifest
        self.bytes_written = 0
        self._root = path.resolve()
        self._handles: dict[str, BinaryIO] = {}
        self._hashes: dict[str, hashlib._Hash] = {}
        self._sizes: dict[str, int] = {}

    def manifest_json(self) -> dict[str, list[int | str]]:
        return {name: [size, sha] for name, (size, sha) in self.manifest.items()}

    def write(self, name: str, offset: int, data: bytes) -> None:
        """Append one chunk; DataLoss for a file the manifest lacks, an unsafe name or a gap."""
        if name not in self.manifest:
            raise DataLoss(f"store sent unexpected file {name!r} for {self.model_id}")
        if name not in self._handles:
            path = (self._root / name).resolve()
            if not path.is_relative_to(self._root):
                raise DataLoss(f"store sent unsafe file name {name!r}")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handles[name] = open(path, "wb")  # noqa: SIM115 - closed in finish/close
            self._hashes[name] = hashlib.sha256()
            self._sizes[name] = 0
        if offset != self._sizes[name]:
            raise DataLoss(f"{name}: chunk at offset {offset}, expected {self._sizes[name]}")
        self._handles[name].write(data)
        self._hashes[name].update(data)
        self._sizes[name] += len(data)
        self.bytes_written += len(data)

    def finish(self) -> None:
        """Check every file against the manifest, then fsync and close them."""
        for name, (size, _) in self.manifest.items():
            if size == 0 and name not in self._handles:  # an empty file may come without a chunk
                self.write(name, 0, b"")
        for name, (size, sha) in self.manifest.items():
            if self._sizes.get(name, 0) != size:
                raise DataLoss(f"{self.model_id}/{name}: received {self._sizes.get(name, 0)} bytes, expected {size}")
            actual = self._hashes[name].hexdigest()
            if sha and actual != sha:
                raise DataLoss(f"{self.model_id}/{name}: sha256 mismatch after copy (expected {sha}, got {actual})")
        for handle in self._handles.values():
            handle.flush()
            os.fsync(handle.fileno())
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def reloading_loader(
    load: Callable[[ModelSpec], LoadedModel], copies: ModelCopies, fetch_again: Callable[[str], ModelSpec]
) -> Callable[[ModelSpec], LoadedModel]:
    """The cache's loader, with one repair: when a load from a copy of ours fails on its files,
    the copy is checked against its manifest (sizes, sha256); a damaged copy is discarded,
    fetched again (``fetch_again(model_id)``: the source's resolve) and loaded once more.

    Raises ModelFilesUnloadable (FAILED_PRECONDITION) when files that match the store's
    manifest do not load: copying again cannot help. Other domain errors of the loader, and
    any failure of a model outside this cache (shared mode), pass through unchanged.
    """

    def load_checked(spec: ModelSpec) -> LoadedModel:
        try:
            return load(spec)
        except Exception as error:
            if not (about_files(error) and copies.owns(spec.path)):
                raise
            problems = copies.verify(spec.path)
            if not problems:
                raise_unloadable(spec, error, fresh=False)
            logger.warning(
                "model load failed on a damaged cached copy; copying it again",
                extra={
                    "model_id": spec.model_id,
                    "path": str(spec.path),
                    "problems": problems[:5],
                    "error": str(error),
                },
            )
            copies.discard(spec.path)
        fresh = fetch_again(spec.model_id)
        try:
            return load(fresh)
        except Exception as error:
            if not about_files(error):
                raise
            raise_unloadable(fresh, error, fresh=True)

    return load_checked


def about_files(error: Exception) -> bool:
    """Whether a load failure may come from the bytes on disk: the engines' ModelLoadFailed and
    ModelFilesMissing, or any exception a library raised (not a domain error such as a wrong kind)."""
    return isinstance(error, (ModelLoadFailed, ModelFilesMissing)) or not isinstance(error, VoxserveError)


def raise_unloadable(spec: ModelSpec, error: Exception, *, fresh: bool) -> NoReturn:
    """FAILED_PRECONDITION for files that match the manifest and still fail: a ModelFilesMissing
    stays itself (its message names the missing files), anything else becomes ModelFilesUnloadable."""
    if isinstance(error, ModelFilesMissing):
        raise error
    detail = str(error) if isinstance(error, VoxserveError) else f"{type(error).__name__}: {error}"
    copy = "a fresh copy whose files" if fresh else "its cached copy, whose files"
    raise ModelFilesUnloadable(
        f"model {spec.model_id!r} does not load from {copy} match the model store's manifest (sizes and sha256): "
        f"{detail}; copying it again cannot help: check the model in the store "
        f"(voxctl models verify {spec.model_id}; voxctl models rm {spec.model_id}, then pull it again)"
    ) from error


def read_marker(target: Path) -> dict[str, tuple[int, str]] | None:
    """The manifest a complete copy was made from; None when missing or not of its shape."""
    try:
        raw = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    manifest: dict[str, tuple[int, str]] = {}
    for name, entry in raw.items():
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)):
            return None
        manifest[name] = (entry[0], entry[1] if isinstance(entry[1], str) else "")
    return manifest


def size_problems(target: Path, manifest: Manifest) -> list[str]:
    problems = []
    for name, (size, _) in sorted(manifest.items()):
        try:
            actual = (target / name).stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if actual != size:
            problems.append(f"{name}: {actual} bytes, expected {size}")
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _files(entry: Path) -> list[Path]:
    if entry.is_symlink() or not entry.is_dir():
        return [entry] if entry.is_file() else []
    return [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
