"""The limits of an upload, enforced on the bytes as they arrive (before any parsing): its size
(413) and the time its body may take (408)."""

from __future__ import annotations

import asyncio
import contextlib
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
        headers={"Connection": "close"},  # past the drain, the rest of the body is never read
    )


def too_slow(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"the request body did not arrive within {seconds:g} s (upload_timeout_seconds); the connection is "
        "closed: send the file again over a faster link, or a smaller or compressed one (OGG, MP3, FLAC)",
        code="upload_timeout",
        param="file",
        headers={"Connection": "close"},  # the rest of the body is never read
    )


class UploadRefused(HTTPException):
    """Raised from ``receive`` once a body breaks a limit: the form parser stops there and
    FastAPI re-raises HTTP exceptions as they are, so the handler answers with ``error``."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.status)
        self.error = error


class UploadTooLarge(UploadRefused):
    def __init__(self, limit: int) -> None:
        super().__init__(too_large(limit))


class UploadTooSlow(UploadRefused):
    def __init__(self, seconds: float) -> None:
        super().__init__(too_slow(seconds))


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: at once from Content-Length, else once the
    streamed bytes pass it. 408 for a body that has not all arrived ``timeout`` seconds after
    the request's headers: a client that sends slowly, or stops, holds its connection and
    request no longer than that. Reads after the body (a wait for the client to disconnect
    while a response streams) have no deadline."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await _drain(receive, DRAIN_LIMIT_BYTES)
            await _answer(send, too_large(self.limit))
            return
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise UploadTooSlow(self.timeout) from None
            if message["type"] != "http.request":  # the client left
                body_done = True
                return message
            body_done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.limit:
                if not body_done:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout_at(deadline):
                            await _drain(receive, DRAIN_LIMIT_BYTES)
                raise UploadTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except UploadRefused as refused:
            if started:
                raise
            await _answer(send, refused.error)


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
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((name.lower().encode(), value.encode()) for name, value in error.headers.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
