"""Property-based fuzzing of every RPC of both services (and the Admin service).

Generated requests (random strings, huge and negative numbers, random bytes as audio) and
raw bytes that are not a valid message (random, truncated) go to real servers on loopback.
For every one: never INTERNAL or UNKNOWN, no crash and no hang (each call has a deadline),
the servers stay SERVING, and no file appears outside their directories.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as pbd
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import InferenceHandle
from voxserve.admin.v1 import admin_pb2
from voxserve.inference.v1 import inference_pb2
from voxserve.modelstore.v1 import modelstore_pb2

SERVICES = (
    modelstore_pb2.DESCRIPTOR.services_by_name["ModelStore"],
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    admin_pb2.DESCRIPTOR.services_by_name["Admin"],
)
BAD_FOR_BAD_INPUT = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
CALL_DEADLINE = 5.0  # a stream that is still open then (WatchModels) ends DEADLINE_EXCEEDED: fine
EXAMPLES = int(os.environ.get("VOXSERVE_FUZZ_EXAMPLES", "25"))

# Strings that hit the validators' edges as well as random text.
NASTY_STRINGS = st.sampled_from(
    [
        "",
        "..",
        "../../etc/passwd",
        "/etc/passwd",
        "whisper-tiny.en",
        "silero-vad",
        "whisper-tiny.en/../../x",
        "a" * 10_000,
        "\x00",
        "CON",
        "model\nwith\nnewlines",
        "%2e%2e%2f",
        "ümlaut-☃",
        "refs/pr/1",
        "0" * 40,
    ]
)
TEXT = st.one_of(NASTY_STRINGS, st.text(max_size=64))
NUMBERS = {
    pbd.FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    pbd.FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    pbd.FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    pbd.FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    pbd.FieldDescriptor.TYPE_DOUBLE: st.floats(allow_nan=True, allow_infinity=True),
    pbd.FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True, allow_infinity=True),
}


def message_class(descriptor: pbd.Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def field_values(field: pbd.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == pbd.FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == pbd.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=2048)
    if field.type == pbd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == pbd.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 1000))  # unknown values too
    if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return NUMBERS[field.type]


def messages(descriptor: pbd.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of a type with a random subset of fields set to random values."""
    cls = message_class(descriptor)
    if depth > 2 or descriptor.full_name.startswith("google.protobuf."):
        return st.just(cls())
    fields = list(descriptor.fields)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields))) if fields else []:
            values = field_values(field, depth)
            if field.is_repeated:
                if field.message_type is not None and field.message_type.GetOptions().map_entry:
                    continue
                items = draw(st.lists(values, max_size=3))
                container = getattr(message, field.name)
                if field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                    for item in items:
                        container.add().CopyFrom(item)
                else:
                    container.extend(items)
            elif field.type == pbd.FieldDescriptor.TYPE_MESSAGE:
                getattr(message, field.name).CopyFrom(draw(values))
            else:
                setattr(message, field.name, draw(values))
        return message

    return build()


def raw_bytes(descriptor: pbd.Descriptor) -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid message: random, or a valid one truncated."""
    truncated = messages(descriptor).map(lambda m: m.SerializeToString()).filter(lambda b: len(b) > 1)
    return st.one_of(
        st.binary(min_size=1, max_size=512),
        truncated.flatmap(lambda data: st.integers(1, len(data) - 1).map(lambda cut: data[:cut])),
    )


def method_path(method: pbd.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def call(channel: grpc.Channel, method: pbd.MethodDescriptor, payloads: list[bytes]) -> grpc.StatusCode:
    """Send serialized payloads to a method through a raw channel; the final status."""
    path = method_path(method)
    identity: Callable[[bytes], bytes] = lambda data: data  # noqa: E731
    streaming_in = method.client_streaming
    try:
        if method.server_streaming:
            stub = (channel.stream_stream if streaming_in else channel.unary_stream)(
                path, request_serializer=identity, response_deserializer=identity
            )
            responses = stub(iter(payloads) if streaming_in else payloads[0], timeout=CALL_DEADLINE)
            for _ in responses:
                pass
        else:
            unary = (channel.stream_unary if streaming_in else channel.unary_unary)(
                path, request_serializer=identity, response_deserializer=identity
            )
            unary(iter(payloads) if streaming_in else payloads[0], timeout=CALL_DEADLINE)
    except grpc.RpcError as error:
        return error.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def every_method() -> list[pbd.MethodDescriptor]:
    return [method for service in SERVICES for method in service.methods]


def files_outside(root: Path, allowed: list[Path]) -> list[Path]:
    allowed_resolved = [a.resolve() for a in allowed]
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not any(path.resolve().is_relative_to(a) for a in allowed_resolved)
    ]


@pytest.fixture
def servers(start_inference: Callable[..., InferenceHandle], tmp_path: Path) -> Iterator[dict[str, Any]]:
    inference = start_inference()
    store = inference.store
    known_before = {p for p in tmp_path.rglob("*") if p.is_file()}
    with grpc.insecure_channel(store.address) as store_channel, grpc.insecure_channel(inference.address) as inf_channel:
        yield {
            "channels": {"ModelStore": store_channel, "Inference": inf_channel, "Admin": inf_channel},
            "health": [health_pb2_grpc.HealthStub(store_channel), health_pb2_grpc.HealthStub(inf_channel)],
            "tmp": tmp_path,
            "allowed": [store.store.data_dir, tmp_path / "inference-cache", *known_before],
        }


def assert_still_serving(servers: dict[str, Any]) -> None:
    for health in servers["health"]:
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", every_method(), ids=method_path)
def test_generated_requests_never_get_internal_or_unknown(
    servers: dict[str, Any], method: pbd.MethodDescriptor
) -> None:
    channel = servers["channels"][method.containing_service.name]
    requests = messages(method.input_type)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(requests, min_size=1, max_size=3))
    def check(batch: list[Message]) -> None:
        code = call(channel, method, [m.SerializeToString() for m in batch])
        assert code not in BAD_FOR_BAD_INPUT, f"{method_path(method)} answered {code.name} to {batch!r}"[:2000]

    check()
    assert_still_serving(servers)
    assert files_outside(servers["tmp"], servers["allowed"]) == []


@pytest.mark.parametrize("method", every_method(), ids=method_path)
def test_undecodable_bytes_are_invalid_argument(servers: dict[str, Any], method: pbd.MethodDescriptor) -> None:
    channel = servers["channels"][method.containing_service.name]

    @settings(max_examples=max(5, EXAMPLES // 3), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw_bytes(method.input_type))
    def check(data: bytes) -> None:
        try:
            message_class(method.input_type).FromString(data)
        except Exception:  # noqa: BLE001 - only bytes protobuf itself rejects are the point here
            code = call(channel, method, [data])
            assert code == grpc.StatusCode.INVALID_ARGUMENT, f"{method_path(method)} answered {code.name} to {data!r}"

    check()
    assert_still_serving(servers)
