"""The one table from domain error categories to gRPC status codes."""

from __future__ import annotations

import grpc

from voxserve_common import errors

# Trailing metadata of every error status a voxserve service sends: the error's category,
# so a client can tell a service that answered with an error from one it could not reach.
ERROR_CATEGORY_KEY = "voxserve-error-category"
# A finer category than its status code's, which an error class declares as its
# ``wire_category`` attribute where one code means two things to a client: audio over a
# size or length limit is RESOURCE_EXHAUSTED like a full job queue, but retrying the same
# request cannot help (the HTTP gateway answers 413 for it, 429 for the rest).
TOO_LARGE = "TooLarge"

STATUS_BY_ERROR: tuple[tuple[type[errors.VoxserveError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.DataLoss, grpc.StatusCode.DATA_LOSS),
    (errors.Cancelled, grpc.StatusCode.CANCELLED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.Internal, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    """The status code a domain error maps to (INTERNAL for anything unexpected)."""
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def error_for_status(code: grpc.StatusCode, message: str) -> errors.VoxserveError:
    """The domain error for a status a downstream service returned (the reverse table)."""
    for error_type, mapped in STATUS_BY_ERROR:
        if mapped == code:
            return error_type(message)
    return errors.Unavailable(message) if code == grpc.StatusCode.UNAVAILABLE else errors.Internal(message)


def wire_category(error: BaseException) -> str:
    """The category an error status carries in its trailers (ERROR_CATEGORY_KEY): the
    error's own ``wire_category`` when it declares one, else its table category."""
    declared = getattr(error, "wire_category", None)
    return declared if isinstance(declared, str) and declared else errors.category_of(error)


def category_for_code(code: grpc.StatusCode) -> str:
    """The error table's class name for a status code (the category of a failed RPC)."""
    for error_type, mapped in STATUS_BY_ERROR:
        if mapped == code:
            return error_type.__name__
    return errors.Internal.__name__
