"""Typed errors of the model store; voxserve_common.grpc_errors maps them to statuses."""

from __future__ import annotations

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
    """Not enough free disk for the files still to fetch."""

    def __init__(self, model_id: str, needed: int, available: int) -> None:
        super().__init__(
            f"not enough disk space for {model_id}: needs {needed} bytes "
            f"({needed / 2**20:.1f} MiB) more, {available} bytes ({available / 2**20:.1f} MiB) available "
            "after the configured reserve; free space or raise disk_reserve_bytes"
        )
        self.needed = needed
        self.available = available


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
