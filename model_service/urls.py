"""Hub endpoint URLs as they may be shown: never with the user:password@ the requests use."""

from __future__ import annotations

import urllib.parse


def display_url(url: str) -> str:
    """``url`` without its user:password@ part: how an endpoint appears in messages,
    events, model records' views and metric labels (the requests still use the full URL)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def url_without_credentials(url: str) -> str:
    """``url`` without user:password@, query or fragment (where tokens hide): for spans and
    the DEBUG lines of hub requests."""
    parts = urllib.parse.urlsplit(display_url(url))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
