"""The manifest of a download: the first endpoint of the chain that answers, as records."""

from __future__ import annotations

import functools
import logging
import threading

from model_service.catalog import CatalogEntry
from model_service.errors import RemoteNotFound, SourcesFailed
from model_service.state import FileRecord
from model_service.store.download.hub import CircuitOpen, HubClient, RemoteManifest, SourceError
from model_service.store.download.retry import TRANSIENT_KINDS, Retrier
from model_service.urls import display_url

logger = logging.getLogger(__name__)


def resolve_manifest(
    hub: HubClient,
    retrier: Retrier,
    endpoints: list[str],
    entry: CatalogEntry,
    revision: str,
    *,
    requested: bool,
    cancel: threading.Event,
) -> RemoteManifest:
    """The manifest from the first of ``endpoints`` that answers (``requested``: the one
    endpoint the pull named); an endpoint whose circuit is open is skipped, transient
    errors are retried with backoff.

    Raises RemoteNotFound when every endpoint said the repo, revision or files do not
    exist, SourcesFailed (every endpoint's reason) otherwise, DownloadCancelled when
    ``cancel`` is set during a backoff.
    """
    reasons: list[str] = []
    not_found = failed = 0
    for endpoint in endpoints:
        try:
            manifest = retrier.call(
                endpoint,
                functools.partial(hub.manifest, endpoint, entry, revision),
                retry_kinds=TRANSIENT_KINDS,
                cancel=cancel,
                cancelled=f"download of {entry.model_id} cancelled",
            )
        except SourceError as error:
            reasons.append(f"{display_url(endpoint)}: {error.reason}")
            not_found += error.not_found
            failed += not (isinstance(error, CircuitOpen) and error.attempts == 0)
            logger.warning("hub source failed; trying the next", extra={"endpoint": endpoint, "reason": error.reason})
            continue
        why = "requested" if requested else "fallback" if failed else "first healthy"
        logger.debug("source choice", extra={"endpoint": display_url(endpoint), "why": why})
        logger.info(
            "source chosen", extra={"endpoint": endpoint, "commit": manifest.commit, "files": len(manifest.files)}
        )
        return manifest
    message = f"every hub source failed for {entry.model_id} ({entry.repo_id}@{revision}): " + "; ".join(reasons)
    if not_found == len(endpoints):
        raise RemoteNotFound(message)
    raise SourcesFailed(message)


def manifest_records(
    manifest: RemoteManifest, entry: CatalogEntry, old_files: dict[str, FileRecord]
) -> tuple[FileRecord, ...]:
    """The manifest as records; a non-LFS file keeps the sha256 computed at an earlier
    download of the same blob (the hub only gives its git oid)."""
    required = set(entry.required_files)
    records = []
    for f in manifest.files:
        sha256 = f.sha256
        old = old_files.get(f.path)
        if old and not sha256 and old.size == f.size and old.git_oid == f.git_oid:
            sha256 = old.sha256
        records.append(FileRecord(f.path, f.size, sha256, f.git_oid, f.path in required))
    return tuple(records)
