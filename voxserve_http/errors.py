"""The one table from gRPC status codes to HTTP statuses, and OpenAI's error JSON shape.

Every failure a caller sees is ``{"error": {"message", "type", "param", "code"}}`` with
the status of the table: routes raise ApiError (the caller's mistake, found here) or let a
backend's status through ``from_rpc``; the exception handlers in ``app.py`` render both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from voxserve_common.grpc_errors import ERROR_CATEGORY_KEY
from voxserve_common.grpc_errors import TOO_LARGE as TOO_LARGE_CATEGORY
from voxserve_common.routing import replica_lost


@dataclass(frozen=True)
class HttpStatus:
    status: int
    type: str  # OpenAI's error "type"
    code: str  # our machine-readable "code" (OpenAI's field of that name)


# OpenAI's SDKs pick their exception class from the status: 400 BadRequestError, 401
# AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 409 ConflictError,
# 429 RateLimitError, >= 500 InternalServerError.
STATUS_BY_CODE: Mapping[grpc.StatusCode, HttpStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HttpStatus(400, "invalid_request_error", "invalid_argument"),
    grpc.StatusCode.OUT_OF_RANGE: HttpStatus(400, "invalid_request_error", "out_of_range"),
    grpc.StatusCode.NOT_FOUND: HttpStatus(404, "invalid_request_error", "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: HttpStatus(409, "invalid_request_error", "already_exists"),
    grpc.StatusCode.FAILED_PRECONDITION: HttpStatus(409, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.ABORTED: HttpStatus(409, "invalid_request_error", "aborted"),
    grpc.StatusCode.CANCELLED: HttpStatus(409, "invalid_request_error", "cancelled"),
    grpc.StatusCode.UNAUTHENTICATED: HttpStatus(401, "authentication_error", "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: HttpStatus(403, "permission_error", "permission_denied"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: HttpStatus(429, "rate_limit_error", "resource_exhausted"),
    grpc.StatusCode.UNAVAILABLE: HttpStatus(503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: HttpStatus(504, "server_error", "deadline_exceeded"),
    grpc.StatusCode.UNIMPLEMENTED: HttpStatus(501, "server_error", "unimplemented"),
    grpc.StatusCode.DATA_LOSS: HttpStatus(500, "server_error", "data_loss"),
    grpc.StatusCode.INTERNAL: HttpStatus(500, "server_error", "internal"),
    grpc.StatusCode.UNKNOWN: HttpStatus(500, "server_error", "internal"),
}
INTERNAL = HttpStatus(500, "server_error", "internal")
TOO_LARGE = HttpStatus(413, "invalid_request_error", "upload_too_large")
# The statuses after which the same request may succeed later: they carry Retry-After.
RETRYABLE = frozenset({429, 503})

# Finer categories (the voxserve-error-category trailer every error status of the services
# carries) that answer with another status than their code's: audio over the inference
# service's size or length limit is RESOURCE_EXHAUSTED like a full job queue or cache, but
# retrying the same request cannot help, so it is 413, not 429 with Retry-After.
STATUS_BY_CATEGORY: Mapping[str, HttpStatus] = {
    TOO_LARGE_CATEGORY: HttpStatus(413, "invalid_request_error", "audio_too_large"),
}


class ApiError(Exception):
    """A failure to answer with ``status`` and OpenAI's error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_argument") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_category(error: grpc.aio.AioRpcError) -> str | None:
    """The category a service sent with its error status; None when the status did not
    come from a voxserve service (the transport made it up: unreachable, deadline)."""
    for key, value in error.trailing_metadata() or ():
        if key == ERROR_CATEGORY_KEY:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def http_status_for(code: grpc.StatusCode, category: str | None = None) -> HttpStatus:
    """The HTTP status of a gRPC status: by its category where that is finer, else by its code."""
    found = STATUS_BY_CATEGORY.get(category or "")
    return found if found is not None else STATUS_BY_CODE.get(code, INTERNAL)


def from_rpc(
    error: grpc.aio.AioRpcError, backend: str, retry_after: int, not_found: tuple[str, str] | None = None
) -> ApiError:
    """The ApiError for a failed call to ``backend`` ("inference service", "model store");
    ``not_found`` = (code, param) for a NOT_FOUND that means a thing the caller named."""
    code = error.code()
    details = error.details() or code.name
    if replica_lost(error) and error_category(error) is None:
        # A proxy cut the stream: the replica went away mid-call. Sent again, another replica
        # answers, so it is 503 with Retry-After (OpenAI's SDKs retry it), not a 500.
        code = grpc.StatusCode.UNAVAILABLE
    mapped = http_status_for(code, error_category(error))
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"the {backend} is unavailable ({details}); retry later"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the {backend} did not answer in time ({details})"
    elif mapped.status >= 500:
        message = f"the {backend} failed: {details}"
    else:
        message = details
    headers = {"Retry-After": str(retry_after)} if mapped.status in RETRYABLE else None
    return ApiError(
        mapped.status,
        message,
        type=mapped.type,
        code=not_found[0] if (code == grpc.StatusCode.NOT_FOUND and not_found) else mapped.code,
        param=not_found[1] if (code == grpc.StatusCode.NOT_FOUND and not_found) else None,
        headers=headers,
    )
