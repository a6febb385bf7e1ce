"""Client strings are untrusted input: the shapes ids must have, and how a bad one is quoted.

A string a client sends reaches three places: a path or URL (only after its domain's check,
e.g. ``model_service.paths``), an error message, and a log field. This module holds what
both services share so no domain invents its own rule: the model id and job id shapes, a
``shown()`` that quotes a value shortened and escaped for a message, and the escaping of
control and invisible characters in a finished log line. docs/security.md ("Confined imports
and paths") lists every client string field and which check applies.
"""

from __future__ import annotations

import re

from voxserve_common.errors import InvalidArgument

# A value quoted in an error message keeps this many characters (then "... (N characters)"):
# enough to recognise a typo, never a 10 kB echo.
MAX_SHOWN = 80

# Catalog model ids: what both services accept before looking anything up (the store's
# catalog, paths under its data_dir, metric labels, the inference cache's keys).
MODEL_ID_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")

# Client-chosen job ids: printable text (spaces and slashes allowed: a job id is never a
# path, only a key and a log field).
MAX_JOB_ID = 128

# C0/C1 controls, DEL, and the invisible format characters that reorder or hide text in a
# terminal or a log viewer (bidi overrides and isolates, zero-width characters, BOM).
_UNSAFE_IN_LINE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]"
)


def shown(value: str, limit: int = MAX_SHOWN) -> str:
    """``repr`` of a client string cut to ``limit`` characters: control, bidi and
    zero-width characters come out escaped (``\\n``, ``\\x1b``, ``\\u202e``), so quoting it
    in a message or a log line can neither split the line nor hide text."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_model_id(model_id: str, field: str = "model_id") -> str:
    """Return model_id if it has the catalog id shape; InvalidArgument otherwise (before
    any lookup, so a hostile id never becomes a path, a metric label or a cache key)."""
    if not model_id:
        raise InvalidArgument(f"{field} is required (e.g. 'whisper-tiny.en'); ListModels shows the catalog")
    if ".." in model_id or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise InvalidArgument(
            f"invalid {field} {shown(model_id)}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return model_id


def check_job_id(job_id: str, field: str = "job_id") -> str:
    """Return job_id if it is at most MAX_JOB_ID printable characters; InvalidArgument otherwise."""
    if len(job_id) > MAX_JOB_ID or not job_id.isprintable():
        raise InvalidArgument(
            f"{field} must be at most {MAX_JOB_ID} printable characters (no control, bidi or zero-width "
            f"characters), not {shown(job_id, 40)}"
        )
    return job_id


def escape_line(text: str) -> str:
    """Escape (``\\uXXXX``) every control and invisible character of a finished JSON log
    line. JSON itself escapes only U+0000-U+001F; DEL, C1 controls and bidi overrides would
    otherwise reach a terminal raw. The line stays valid JSON with the same values."""
    return _UNSAFE_IN_LINE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)
