"""A request as the interceptor sees it: decoded without trusting its bytes, and shown at DEBUG.

Bytes that are not a valid message become INVALID_ARGUMENT from the handler (not grpc's
UNKNOWN for an exception in its deserializer). At DEBUG every RPC logs its request's
fields ("rpc request"), shown so a log line can be read by anyone who may read the logs:
client strings escaped and cut (``shown()``), bytes fields as their length (never audio or
file bytes), secret-named fields masked and credentials in values redacted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from voxserve_common.client_strings import shown
from voxserve_common.errors import InvalidArgument
from voxserve_common.redaction import MASK, SECRET_NAME, Redactor

logger = logging.getLogger(__name__)

# A repeated field shows this many items, then how many there were: a request with
# thousands of model ids must not make a record of thousands of lines.
MAX_SHOWN_ITEMS = 16
# The patterns alone (bearer tokens, hub tokens, user:password@ in URLs, secrets in query
# strings); the values a service was configured with are masked again by every log handler.
_REDACTOR = Redactor()


@dataclass(frozen=True)
class Undecodable:
    """What the tolerant deserializer hands the handler instead of a message it could not parse."""

    method: str
    reason: str


def tolerant(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns Undecodable instead of raising on the caller's bytes."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and friends: the caller's bytes
            return Undecodable(method, str(error) or type(error).__name__)

    return decode


def checked(request: Any) -> Any:
    """The request, or InvalidArgument when its bytes did not decode."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(
            f"the request to {request.method} is not a valid protobuf message ({request.reason}); "
            "check that the client's generated code comes from the service's .proto files"
        )
    return request


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream checked message by message; the first one is logged at DEBUG (it
    carries the options; the rest of such streams is audio)."""
    first = True
    async for received in requests:
        request = checked(received)
        if first:
            log_request(request, stream=True)
            first = False
        yield request


def log_request(request: Any, stream: bool = False) -> None:
    """One DEBUG record "rpc request: <fields>" with the fields also as ``request`` (JSON)."""
    if not logger.isEnabledFor(logging.DEBUG) or not isinstance(request, Message):
        return
    fields = request_fields(request)
    extra: dict[str, Any] = {"request": fields, "request_type": request.DESCRIPTOR.full_name}
    if stream:
        extra["request_stream"] = True
    logger.debug("rpc request: %s", fields_text(fields), extra=extra)


def request_fields(message: Message) -> dict[str, Any]:
    """The fields set in ``message`` as plain values safe to log (see the module docstring)."""
    return {field.name: _field_value(field, value) for field, value in message.ListFields()}


def fields_text(fields: dict[str, Any]) -> str:
    """``request_fields`` as one line: ``model_id='x' audio=<4 bytes> options={...}``."""
    return " ".join(f"{name}={_text(value)}" for name, value in fields.items()) or "(no fields set)"


def _field_value(field: FieldDescriptor, value: Any) -> Any:
    if SECRET_NAME.search(field.name):
        return MASK
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        items = list(value.items())
        value_field = field.message_type.fields_by_name["value"]
        shown_items = {shown(str(k)): _single(value_field, v) for k, v in items[:MAX_SHOWN_ITEMS]}
        if len(items) > MAX_SHOWN_ITEMS:
            shown_items["..."] = f"{len(items)} entries"
        return shown_items
    if field.is_repeated:
        values = [_single(field, item) for item in list(value)[:MAX_SHOWN_ITEMS]]
        if len(value) > MAX_SHOWN_ITEMS:
            values.append(f"... ({len(value)} items)")
        return values
    return _single(field, value)


def _single(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_BYTES:
        return f"<{len(value)} bytes>"
    if field.type == FieldDescriptor.TYPE_STRING:
        return shown(_REDACTOR.redact(value))
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        known = field.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if isinstance(value, Message):
        return request_fields(value)
    return value


def _text(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{name}={_text(item)}" for name, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_text(item) for item in value) + "]"
    return str(value)
