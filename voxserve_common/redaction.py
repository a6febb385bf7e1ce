"""Secret redaction for every log output: tokens, credentials in URLs, secret settings.

It works on the final text a handler writes (message, extra fields and traceback alike),
so no code path can log a secret by putting it somewhere the formatter did not expect.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

MASK = "[REDACTED]"

# A setting or field whose name says it holds a secret.
SECRET_NAME = re.compile(r"(secret|token|passw(or)?d|api[_-]?key|private[_-]?key|credential|authorization)", re.I)

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Bearer / Basic credentials wherever they appear (headers, metadata dumps, messages).
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.I), r"\1 " + MASK),
    # name=value / "name": "value" pairs whose name says secret (JSON lines, reprs, env dumps).
    (
        re.compile(
            r"""((?:["']?)\b[\w.-]*?(?:secret|token|passw(?:or)?d|api[_-]?key|private[_-]?key|authorization)s?"""
            r"""["']?\s*[:=]\s*["']?)(?!\[REDACTED\])(?!Bearer\b|Basic\b)"""
            # JSON literals are no secret, and masking them would break the JSON line.
            r"""(?!(?:null|true|false|None|-?\d[\d.eE+-]*)(?:[\s,;}\]]|$))([^"'\s,;&#)}\]]+)""",
            re.I,
        ),
        r"\1" + MASK,
    ),
    # Hugging Face user access tokens.
    (re.compile(r"\bhf_[A-Za-z0-9]{16,}"), "hf_" + MASK),
    # user:password@ in URLs.
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@\"']+:)[^@\s/\"']+@", re.I), r"\1" + MASK + "@"),
    # Secrets in query strings.
    (
        re.compile(
            r"([?&](?:access_token|token|api_key|apikey|key|password|passwd|secret|sig|signature|auth)=)[^&\s\"'#]+",
            re.I,
        ),
        r"\1" + MASK,
    ),
)


class Redactor:
    """Masks secret patterns and the exact values registered with ``add_secret``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add_secret(self, value: str) -> None:
        """Mask this exact value wherever it appears (a configured token, a key file's content)."""
        value = value.strip()
        if len(value) < 4:  # a one-letter "secret" would mask every word containing it
            return
        with self._lock:
            if value not in self._values:
                # Longest first, so a secret that contains another is masked whole.
                self._values = tuple(sorted((*self._values, value), key=len, reverse=True))

    def add_secrets_of(self, settings: Any) -> None:
        """Register the values of every field of a settings dataclass whose name says secret."""
        for name, value in _named_values(settings):
            if SECRET_NAME.search(name):
                for item in _strings(value):
                    self.add_secret(item)

    def redact(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


def _named_values(settings: Any) -> Iterable[tuple[str, Any]]:
    if is_dataclass(settings) and not isinstance(settings, type):
        return ((f.name, getattr(settings, f.name)) for f in fields(settings))
    if isinstance(settings, Mapping):
        return ((str(k), v) for k, v in settings.items())
    return ()


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item)


def redact_settings(settings: Any) -> dict[str, Any]:
    """The settings as a dict for a start-up record, secret-named values masked."""
    return {name: (MASK if SECRET_NAME.search(name) and value else value) for name, value in _named_values(settings)}


class RedactingFormatter(logging.Formatter):
    """Wraps another formatter and redacts everything it produced."""

    def __init__(self, inner: logging.Formatter, redactor: Redactor) -> None:
        super().__init__()
        self.inner = inner
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor.redact(self.inner.format(record))
