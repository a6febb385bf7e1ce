"""Tables and JSON for the terminal: protos become plain dicts, rows become aligned columns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:
    # Message.DESCRIPTOR is typed as either implementation's descriptor (pure Python or upb).
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

_TIMESTAMP = "google.protobuf.Timestamp"


def message_to_dict(message: Message) -> dict[str, Any]:
    """Proto field names, enum names, int64 as numbers (unlike the proto3 JSON mapping,
    which quotes them), timestamps as RFC 3339; unset sub-messages and oneof members
    are left out, scalars always present."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            result[field.name] = [_value(field, item) for item in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE or field.containing_oneof is not None:
            if message.HasField(field.name):
                result[field.name] = _value(field, value)
        else:
            result[field.name] = _value(field, value)
    return result


def _value(field: FieldDescriptor | UpbFieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type is not None and field.message_type.full_name == _TIMESTAMP:
            return value.ToJsonString() if (value.seconds or value.nanos) else None
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return len(value)
    return value


def print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    out.flush()


def print_json_line(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, ensure_ascii=False) + "\n")
    out.flush()


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell, two spaces apart; ``right`` names the
    columns to right-align (numbers and sizes)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    aligned_right = {headers.index(name) for name in right}
    lines = []
    for row in (headers, *rows):
        cells = [cell.rjust(widths[i]) if i in aligned_right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"
