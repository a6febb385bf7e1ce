"""Async gRPC clients of the model store and the inference service, one channel each.

Every call carries the request's trace context (``traceparent``) and the caller's
``Authorization`` header (or the backend token, for a caller without one) as
``authorization`` metadata; a failed call becomes an ApiError naming the backend, through
the one table in errors.py. The channels use TLS when the store_tls_* / inference_tls_*
settings give a CA.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from voxserve.inference.v1 import inference_pb2 as ipb
from voxserve.inference.v1 import inference_pb2_grpc
from voxserve.modelstore.v1 import modelstore_pb2_grpc
from voxserve_common.routing import model_metadata
from voxserve_common.tls import RECONNECT_BACKOFF_OPTIONS, open_aio_channel
from voxserve_common.tracing import trace_metadata
from voxserve_http.config import GatewayConfig
from voxserve_http.errors import ApiError, from_rpc
from voxserve_http.security import GatewaySecurity

STORE = "model store"
INFERENCE = "inference service"
# Audio up to this size goes in one Transcribe request. A client-streaming call loses the
# service's status when the service answers before it has read every chunk (an
# UNAUTHENTICATED from the interceptor, a size limit): grpc.aio turns the failed write into
# INTERNAL 'Internal error from Core'. A unary request is sent in one batch with its
# metadata, so the service's own status comes back.
SINGLE_MESSAGE_AUDIO_BYTES = 60 << 20  # with the options, under the services' 64 MiB
# Larger audio goes to TranscribeStream in chunks of this size.
AUDIO_CHUNK_BYTES = 1 << 20


def call_metadata(authorization: str | None, model: str = "") -> list[tuple[str, str]]:
    """Metadata of one outgoing call: the current trace, the caller's credentials, and the
    model the call is about (``x-voxserve-model``, so that a proxy in front of several
    inference replicas routes it to the one that holds the model).

    The gateway checks no token itself: the services do (UNAUTHENTICATED -> 401,
    PERMISSION_DENIED -> 403). A header gRPC cannot carry is the caller's mistake.
    """
    metadata = trace_metadata() + model_metadata(model)
    if authorization is not None:
        if not authorization.isascii() or not authorization.isprintable():
            raise ApiError(
                401,
                "the Authorization header holds characters that are not printable ASCII; send 'Bearer <token>'",
                type="authentication_error",
                code="malformed_authorization",
            )
        metadata.append(("authorization", authorization))
    return metadata


class Backends:
    """The two services the gateway translates to; opened at start-up, closed at shutdown."""

    def __init__(self, config: GatewayConfig, security: GatewaySecurity | None = None) -> None:
        self.config = config
        security = security or GatewaySecurity()
        # No token on the channels: the token goes per call, only for callers without one.
        self.backend_token = security.backend_token
        # Reconnect within a second of a backend coming back, not after gRPC's default backoff.
        self.store_channel = open_aio_channel(config.model_store, security.store_tls, options=RECONNECT_BACKOFF_OPTIONS)
        self.inference_channel = open_aio_channel(
            config.inference, security.inference_tls, options=RECONNECT_BACKOFF_OPTIONS
        )
        self.store = modelstore_pb2_grpc.ModelStoreStub(self.store_channel)
        self.inference = inference_pb2_grpc.InferenceStub(self.inference_channel)

    async def close(self, grace: float | None = None) -> None:
        await self.store_channel.close(grace)
        await self.inference_channel.close(grace)

    def _error(self, error: grpc.aio.AioRpcError, backend: str, not_found: tuple[str, str] | None) -> ApiError:
        return from_rpc(error, backend, self.config.retry_after_seconds, not_found)

    async def unary(
        self,
        backend: str,
        method: Any,
        request: Any,
        authorization: str | None,
        *,
        not_found: tuple[str, str] | None = None,
    ) -> Any:
        """One unary call with the configured deadline; ApiError when it fails."""
        try:
            return await method(
                request, timeout=self.config.request_timeout_seconds, metadata=call_metadata(authorization)
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error, backend, not_found) from None

    async def stream(
        self,
        backend: str,
        call: Any,
        *,
        not_found: tuple[str, str] | None = None,
    ) -> AsyncIterator[Any]:
        """The responses of a started streaming call; ApiError when it fails. Closing the
        iterator (an HTTP client that went away) cancels the call, which stops the work."""
        try:
            async for item in call:
                yield item
        except grpc.aio.AioRpcError as error:
            raise self._error(error, backend, not_found) from None
        finally:
            call.cancel()

    def streaming_transcribe(
        self, requests: AsyncIterator[ipb.StreamingTranscribeRequest], authorization: str | None
    ) -> Any:
        """Start a live stream (StreamingTranscribe) fed by ``requests``; read it with stream().
        No deadline: it lasts as long as its client sends audio (the realtime session's idle
        limit ends a silent one)."""
        return self.inference.StreamingTranscribe(requests, metadata=call_metadata(authorization))

    async def serving(self) -> dict[str, str]:
        """Each backend's health status name (SERVING, NOT_SERVING, or why it is unknown)."""
        out: dict[str, str] = {}
        for name, channel in ((STORE, self.store_channel), (INFERENCE, self.inference_channel)):
            stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs package declares no methods on it
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                out[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                out[name] = f"{error.code().name}: {error.details()}"
        return out


async def audio_chunks(first: ipb.TranscribeOptions, audio: bytes) -> AsyncIterator[ipb.TranscribeChunk]:
    """TranscribeStream's requests: the options with the first chunk, then the rest."""
    chunks: Sequence[bytes] = [audio[i : i + AUDIO_CHUNK_BYTES] for i in range(0, len(audio), AUDIO_CHUNK_BYTES)]
    yield ipb.TranscribeChunk(options=first, audio=chunks[0] if chunks else b"")
    for chunk in chunks[1:]:
        yield ipb.TranscribeChunk(audio=chunk)
