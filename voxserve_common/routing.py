"""The routing key of inference calls: the model id as gRPC metadata, for proxies that hash on it.

A proxy in front of several inference replicas (HAProxy ``balance hdr(x-voxserve-model)``,
nginx ``hash $http_x_voxserve_model consistent``, Envoy/Istio ``RING_HASH`` on a header) can
only see metadata, never the protobuf body, so every client sends the model it asks for as
``x-voxserve-model``: calls for one model reach the replica that already holds it. The
inference service refuses a header that names another model than the call uses
(INVALID_ARGUMENT), so a proxy never routes on a value the service will not use.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
import grpc.aio

MODEL_HEADER = "x-voxserve-model"
# What HAProxy (deploy/haproxy/haproxy.cfg) adds to every response: the replica that served it.
REPLICA_HEADER = "x-voxserve-replica"

# How a proxy reports a replica that went away in the middle of a call: HAProxy ends the
# client's stream without trailers, nginx resets it (both after the response had started;
# before it, the proxy retries on another replica or answers 503, which is UNAVAILABLE).
_CUT_STREAM_DETAILS = ("Stream removed", "RST_STREAM")


def model_metadata(model_id: str) -> list[tuple[str, str]]:
    """``[("x-voxserve-model", model_id)]``, or nothing for an empty id (the service's default
    model: the proxy balances such calls by load) or one that cannot be a header value (the
    service refuses the id itself, naming it)."""
    if not model_id or not model_id.isascii() or not model_id.isprintable():
        return []
    return [(MODEL_HEADER, model_id)]


def header_values(metadata: Iterable[tuple[str, str | bytes]] | None, name: str) -> list[str]:
    """Every value of the header ``name`` in call metadata (names are lower case in gRPC)."""
    found = []
    for key, value in metadata or ():
        if key == name:
            found.append(value.decode("ascii", "replace") if isinstance(value, bytes) else value)
    return found


def replica_lost(error: grpc.RpcError) -> bool:
    """True when a call may be sent again because the replica serving it went away: UNAVAILABLE
    (no replica reached, or the proxy answered 503), or a stream a proxy cut without a status.

    A transcription is idempotent, so a client resubmits such a call (a job on the lost replica
    is gone with it); any other status is the service's answer and is final.
    """
    # A blocking call's error is a grpc.Call; an aio call's (AioRpcError) has the same methods.
    if not isinstance(error, grpc.Call | grpc.aio.AioRpcError):
        return False
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    details = error.details() or ""
    cut = code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
    return cut and any(marker in details for marker in _CUT_STREAM_DETAILS)
