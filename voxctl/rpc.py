"""Channels, deadlines and trace context for one voxctl command."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from voxserve.inference.v1 import inference_pb2_grpc
from voxserve.modelstore.v1 import modelstore_pb2_grpc
from voxserve_common.routing import model_metadata
from voxserve_common.tls import ClientTls, open_channel
from voxserve_common.tracing import trace_metadata

# Unary calls that only read or change bookkeeping; a hung server should not hang the CLI.
DEFAULT_UNARY_TIMEOUT = 30.0

OWN_CONNECTIONS = [("grpc.use_local_subchannel_pool", 1)]


class CliError(Exception):
    """A failure to report as ``error: <message>`` with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def command_trace() -> Iterator[str]:
    """Make one trace current for the whole command and yield its id.

    voxctl exports no spans; it only originates the trace so that every server span of
    the command (and every log line, which carries trace_id) shares one id, which voxctl
    prints with errors.
    """
    context = SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    with trace.use_span(NonRecordingSpan(context)):
        yield format(context.trace_id, "032x")


@dataclass
class Session:
    """Lazily opened channels to both services plus the command's output streams."""

    store_address: str
    inference_address: str
    timeout: float | None = None
    json: bool = False
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    tls: ClientTls | None = None  # --tls-ca/--tls-cert/--tls-key; plaintext when None
    token: str | None = None  # sent as authorization: Bearer on every call
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            # Its own connections (not gRPC's process-wide pool), so that reconnect gets a new one.
            self._channels[address] = open_channel(address, self.tls, self.token, OWN_CONNECTIONS)
        return self._channels[address]

    def store(self) -> modelstore_pb2_grpc.ModelStoreStub:
        return modelstore_pb2_grpc.ModelStoreStub(self.channel(self.store_address))

    def reconnect(self, address: str) -> None:
        """The next call to ``address`` opens a new connection. A call sent again after a
        proxy's 503 once waited forever on the old connection (CI, behind compose's HAProxy at
        start-up; the cause is not proven: a spent HTTP/2 flow-control window is the suspect)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel(self.inference_address))

    def call(
        self, method: Any, request: Any, default_timeout: float | None = DEFAULT_UNARY_TIMEOUT, model: str = ""
    ) -> Any:
        """Invoke ``method`` with the command's trace context and deadline: ``--timeout``
        when given, else ``default_timeout`` (pass None for streams that may run for long:
        the call then iterates responses and has ``cancel()``). ``model``: the model the call
        is about, sent as ``x-voxserve-model`` so that a proxy routes it to the replica that
        holds the model (voxserve_common/routing.py)."""
        timeout = self.timeout if self.timeout is not None else default_timeout
        return method(request, timeout=timeout, metadata=trace_metadata() + model_metadata(model))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def status_line(error: grpc.RpcError) -> str:
    """``CODE: message`` of a failed call."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    name = code.name if code is not None else "UNKNOWN"
    return f"{name}: {details or '(no message)'}"


def error_code(error: grpc.RpcError) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.Call) else None
