"""Typed reading of the JSON files the store wrote and must not trust (state.json, queue.json)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TypeVar, cast

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BadShape(ValueError):
    """A document, or a field of it, is not of the shape the store writes; the message
    says where (``models[1].files[0].size``) and what was found."""


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def as_object(value: object, where: str) -> dict[str, object]:
    """``value`` as a JSON object (string keys); BadShape otherwise."""
    if not isinstance(value, dict):
        raise BadShape(f"{where}: expected an object, found {_kind(value)}")
    return cast(dict[str, object], value)


def as_list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise BadShape(f"{where}: expected a list, found {_kind(value)}")
    return value


def typed(data: dict[str, object], key: str, kind: type[T], where: str, default: T | None = None) -> T:
    """``data[key]`` of exactly ``kind`` (a bool is not an int; an int is accepted as a
    float); ``default`` when the key is missing, BadShape when it is required or mistyped."""
    if key not in data:
        if default is None:
            raise BadShape(f"{where}.{key}: missing")
        return default
    value = data[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return cast(T, float(value))
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadShape(f"{where}.{key}: expected {kind.__name__}, found {_kind(value)}")
    return value


def optional_str(data: dict[str, object], key: str, where: str) -> str | None:
    """``data[key]`` as a string, None when missing, null or empty; BadShape for other types."""
    value = data.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadShape(f"{where}.{key}: expected a string or null, found {_kind(value)}")
    return value


def read_json(path: Path) -> object:
    """The parsed document; FileNotFoundError when missing, OSError or ValueError when unreadable."""
    return json.loads(path.read_bytes())


def move_aside(path: Path, message: str, problem: str) -> Path | None:
    """Rename a bad ``path`` to ``<name>.broken-<unix time>`` next to it, so the operator
    keeps it and the store can start without it, and log ``message`` as an error naming
    both. Returns the new path, None when even the rename failed (logged too)."""
    broken = path.with_name(f"{path.name}.broken-{int(time.time())}")
    try:
        os.replace(path, broken)
    except OSError as error:
        logger.error(
            f"{message}; could not move it aside",
            extra={"file": str(path), "problem": problem, "error": str(error)},
        )
        return None
    logger.error(
        f"{message}; moved aside",
        extra={"file": str(path), "moved_to": str(broken), "problem": problem},
    )
    return broken
