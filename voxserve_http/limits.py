"""The upload size limit, enforced on the bytes as they arrive (before any parsing)."""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxserve_http.errors import TOO_LARGE, ApiError

# After the limit is hit, up to this many more bytes are read and dropped so that the
# client, which sends its whole body before it reads the answer, gets the 413 instead of a
# reset connection. Beyond it the connection is closed with the answer unread.
DRAIN_LIMIT_BYTES = 64 << 20


def too_large(limit: int) -> ApiError:
    return ApiError(
        TOO_LARGE.status,
        f"the request body is over the upload limit of {limit} bytes; send a shorter clip or a compressed "
        "format (OGG, MP3, FLAC)",
        type=TOO_LARGE.type,
        code=TOO_LARGE.code,
        param="file",
    )


class UploadTooLarge(HTTPException):
    """Raised from ``receive`` once a body passes the limit: the form parser stops there
    and FastAPI re-raises HTTP exceptions as they are, so the handler answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(TOO_LARGE.status)
        self.error = too_large(limit)


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from Content-Length, else once the
    streamed bytes pass it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _drain(receive, DRAIN_LIMIT_BYTES)
            await _answer(send, too_large(self.limit))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_LIMIT_BYTES)
                    raise UploadTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except UploadTooLarge:
            if started:
                raise
            await _answer(send, too_large(self.limit))


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _answer(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
