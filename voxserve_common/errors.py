"""Domain error categories; the gRPC edge maps each category to one status code.

Domain modules raise subclasses of these (``ModelNotFound(NotFound)``) and never import
grpc. ``voxserve_common.grpc_errors.STATUS_BY_ERROR`` is the single table that turns a
category into a status code at the edge.
"""

from __future__ import annotations


class VoxserveError(Exception):
    """Base of every error a client should see with a specific status and message."""


class InvalidArgument(VoxserveError):
    """The request itself is wrong (bad id, bad audio, bad option)."""


class NotFound(VoxserveError):
    """The named thing does not exist (unknown model id, unknown job)."""


class AlreadyExists(VoxserveError):
    """The thing to create exists already."""


class FailedPrecondition(VoxserveError):
    """The system is not in a state that allows the request (not enough disk, in use)."""


class ResourceExhausted(VoxserveError):
    """A limit was hit (memory budget, queue length, size limit)."""


class Unavailable(VoxserveError):
    """A dependency could not be reached (every hub source failed, store down)."""


class DataLoss(VoxserveError):
    """Bytes did not match what they must be (sha256 or size mismatch)."""


class Cancelled(VoxserveError):
    """The work was cancelled by a client."""


class DeadlineExceeded(VoxserveError):
    """The work ran past its deadline."""


class Unauthenticated(VoxserveError):
    """The call carries no valid credentials (no token, an unknown or revoked one)."""


class PermissionDenied(VoxserveError):
    """The caller is known but not allowed to do this (a role it lacks, a path outside the allowed roots)."""


class Internal(VoxserveError):
    """A bug or an unexpected failure; the message says what was being done."""


# The categories in the order of the error table (voxserve_common.grpc_errors); a log
# record or a metric names the first one an error is an instance of.
CATEGORIES: tuple[type[VoxserveError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    DataLoss,
    Cancelled,
    DeadlineExceeded,
    Unauthenticated,
    PermissionDenied,
    Internal,
)


def category_of(error: BaseException) -> str:
    """The error table's class name for an error; anything unexpected is Internal."""
    for category in CATEGORIES:
        if isinstance(error, category):
            return category.__name__
    return Internal.__name__
