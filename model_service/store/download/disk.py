"""The store's own disk during a download: free space up front, files moved into place, and
the errors of reads and writes that fail (the disk's, never a source's)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from model_service.errors import DISK_FULL_ERRNOS, DiskFull, InsufficientDisk, LocalDiskFailed, UnsafePath
from model_service.paths import safe_join
from model_service.state import fsync_dir
from model_service.store.download.files import LocalDiskError, PartialFile
from model_service.store.download.plan import Plan
from voxserve_common.errors import VoxserveError

logger = logging.getLogger(__name__)


def check_free_space(data_dir: Path, model_id: str, plan: Plan, reserve: int) -> None:
    """Raise InsufficientDisk unless the transfers still to do fit, ``reserve`` bytes kept free."""
    free = shutil.disk_usage(data_dir).free
    logger.debug(
        "download planned",
        extra={
            "files": len(plan.files),
            "to_fetch": [r.path for r in plan.to_fetch],
            "to_verify": [f.path for f in plan.to_verify],
            "present_bytes": plan.present_bytes,
            "resumable_bytes": plan.resumable_bytes,
            "needed_bytes": plan.needed_bytes,
            "free_bytes": free,
        },
    )
    available = free - reserve
    if plan.needed_bytes > available:
        raise InsufficientDisk(model_id, plan.needed_bytes, max(0, available))


def disk_error(error: OSError | LocalDiskError, data_dir: Path, model_id: str, needed: int) -> VoxserveError | None:
    """The error a download ends with when the store's own disk failed it: DiskFull for a
    full disk or quota, LocalDiskFailed for another failure of a file in ``data_dir``.
    None for an OSError that is not the data dir's (a bug: the caller reports it as such)."""
    if isinstance(error, LocalDiskError):
        os_error, path, operation, kept = error.error, error.path, error.operation, error.kept
    else:
        os_error, path, operation, kept = error, Path(str(error.filename or data_dir)), "write", 0
    if os_error.errno in DISK_FULL_ERRNOS:
        try:
            free = shutil.disk_usage(data_dir).free
        except OSError:
            free = 0
        return DiskFull(str(data_dir), free, needed, f"{model_id}, writing {path.name.removesuffix('.part')}", kept)
    if not isinstance(error, LocalDiskError) and not path.is_relative_to(data_dir):
        return None
    code = errno.errorcode.get(os_error.errno or 0, "no errno")
    return LocalDiskFailed(
        f"cannot {operation} {path}: {os_error.strerror or os_error} ({code}); the download of {model_id} "
        f"stopped: fix the data dir's filesystem, then pull again"
        + (f" (the {kept / 2**20:.1f} MiB of {path.name.removesuffix('.part')} on disk resume)" if kept else "")
    )


def move_into_place(partial: PartialFile, model_dir: Path, relative: str) -> None:
    """Rename a checked ``.part`` file to its place in ``model_dir`` (fsync the directory)."""
    target = safe_join(model_dir, relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.parent.is_symlink() or not target.parent.resolve().is_relative_to(model_dir.resolve()):
        raise UnsafePath(f"refusing to write {relative}: its directory leaves {model_dir}")
    os.replace(partial.part, target)
    fsync_dir(target.parent)
    partial.remove()
    logger.debug("file moved into place", extra={"file": relative})
