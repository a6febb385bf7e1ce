"""Integrity checks: sizes, sha256 and git blob sha1 of model files."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_service.errors import DownloadCancelled
from model_service.paths import safe_join
from model_service.state import FileRecord

HASH_CHUNK = 4 * 1024 * 1024


class FileHasher:
    """sha256 of the content and the git blob sha1 (``blob <size>\\0`` + content) at once,
    so every hub file can be checked: LFS files by sha256, small ones by their git oid."""

    def __init__(self, expected_size: int, git_sha1: bool = True) -> None:
        self.sha256 = hashlib.sha256()
        # Only needed where the hub gives no sha256 (small non-LFS files) or for records.
        self._git = hashlib.sha1(f"blob {expected_size}\0".encode(), usedforsecurity=False) if git_sha1 else None
        self.size = 0

    @property
    def git_sha1(self) -> hashlib._Hash:
        if self._git is None:
            raise ValueError("this hasher was built without the git blob sha1")
        return self._git

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self._git is not None:
            self._git.update(data)
        self.size += len(data)


def hash_file(
    path: Path,
    expected_size: int | None = None,
    cancel: threading.Event | None = None,
    limit: int | None = None,
    git_sha1: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    block_size: int = HASH_CHUNK,
) -> FileHasher:
    """Hash the first ``limit`` bytes (all when None) of path; ``on_bytes(n)`` after each
    block (verification progress)."""
    size = path.stat().st_size if expected_size is None else expected_size
    hasher = FileHasher(size, git_sha1)
    remaining = limit
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("cancelled while hashing")
            block = handle.read(block_size if remaining is None else min(block_size, remaining))
            if not block:
                break
            hasher.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
            if remaining is not None:
                remaining -= len(block)
    return hasher


@dataclass(frozen=True)
class FileCheck:
    path: str
    ok: bool
    problem: str = ""
    expected_size: int = 0
    actual_size: int = 0
    expected_sha256: str = ""
    actual_sha256: str = ""


def check_file(
    model_dir: Path,
    record: FileRecord,
    deep: bool,
    cancel: threading.Event | None = None,
    on_bytes: Callable[[int], None] | None = None,
    block_size: int = HASH_CHUNK,
) -> FileCheck:
    """Compare one file with its record: presence and size always; hashes when deep
    (``on_bytes`` is called per block hashed)."""
    path = safe_join(model_dir, record.path)
    base: dict[str, Any] = {"path": record.path, "expected_size": record.size, "expected_sha256": record.sha256}
    if not path.is_file():
        return FileCheck(ok=False, problem="missing", **base)
    actual_size = path.stat().st_size
    if actual_size != record.size:
        return FileCheck(
            ok=False, problem=f"size {actual_size} != expected {record.size}", actual_size=actual_size, **base
        )
    if record.required and actual_size == 0:
        return FileCheck(ok=False, problem="required file is empty", actual_size=0, **base)
    if not deep:
        return FileCheck(ok=True, actual_size=actual_size, **base)
    hasher = hash_file(path, record.size, cancel, git_sha1=not record.sha256, on_bytes=on_bytes, block_size=block_size)
    actual = hasher.sha256.hexdigest()
    if record.sha256 and actual != record.sha256:
        return FileCheck(ok=False, problem="sha256 mismatch", actual_size=actual_size, actual_sha256=actual, **base)
    if not record.sha256 and record.git_oid and hasher.git_sha1.hexdigest() != record.git_oid:
        return FileCheck(
            ok=False, problem="git blob sha1 mismatch", actual_size=actual_size, actual_sha256=actual, **base
        )
    return FileCheck(ok=True, actual_size=actual_size, actual_sha256=actual, **base)
