"""Typed errors of the model store; voxserve_common.grpc_errors maps them to statuses."""

from __future__ import annotations

import errno

from voxserve_common.errors import (
    Cancelled,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)


class InvalidModelId(InvalidArgument):
    """A model id, revision or file name failed validation."""


class UnsafePath(InvalidArgument):
    """A path would read or write outside the directory it belongs to."""


class ModelNotFound(NotFound):
    """The model id is not in the catalog."""


class RemoteNotFound(NotFound):
    """Every hub source said the repo, revision or file does not exist."""


class ModelBusy(FailedPrecondition):
    """The model is downloading, waiting, verifying or being fetched."""


class ModelNotReady(FailedPrecondition):
    """The operation needs a READY model."""


class InsufficientDisk(FailedPrecondition):
    """Not enough free disk for the files still to fetch, found before the download starts.

    FAILED_PRECONDITION, not RESOURCE_EXHAUSTED: retrying cannot help until someone frees
    space (RESOURCE_EXHAUSTED reads as "back off and retry", and the HTTP gateway turns it
    into 429 with Retry-After). DiskFull, the same condition found by a failed write, is
    one of these, so a client handles both alike."""

    def __init__(self, model_id: str, needed: int, available: int) -> None:
        super().__init__(
            f"not enough disk space for {model_id}: needs {needed} bytes "
            f"({needed / 2**20:.1f} MiB) more, {available} bytes ({available / 2**20:.1f} MiB) available "
            "after the configured reserve; free space or lower disk_reserve_bytes"
        )
        self.needed = needed
        self.available = available


# A write that fails with one of these found the disk, or the user's quota on it, full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFull(InsufficientDisk):
    """A write failed during a download because the disk (or a quota) is full; the partial
    files are kept and the next pull resumes them."""

    def __init__(self, directory: str, free: int, needed: int, doing: str, kept: int = 0, again: str = "pull") -> None:
        resume = f": the {kept / 2**20:.1f} MiB downloaded are kept and resume" if kept else ""
        FailedPrecondition.__init__(
            self,
            f"disk full: {free / 2**20:.1f} MiB free in {directory}, needs {needed / 2**20:.1f} MiB more "
            f"({doing}); free space, then {again} again{resume}",
        )
        self.needed = needed
        self.available = free


class LocalDiskFailed(FailedPrecondition):
    """Reading or writing the store's own files failed for another reason than space (a
    read-only or broken filesystem, a file size limit, permissions): an operator must fix
    the data dir's filesystem; the hub sources are not at fault."""


class SourcesFailed(Unavailable):
    """Every hub endpoint failed; the message lists each source's reason."""


class IntegrityError(DataLoss):
    """Downloaded or imported bytes do not match their size or hash."""


class DownloadCancelled(Cancelled):
    """A client cancelled the download."""


class DownloadPaused(FailedPrecondition):
    """PauseDownload stopped the download a pull was following; ResumeDownload continues it."""


class UnknownSource(InvalidArgument):
    """PullModelRequest.source names no configured hub endpoint."""


class ImportFailed(InvalidArgument):
    """The import source directory lacks required files or is unreadable."""
