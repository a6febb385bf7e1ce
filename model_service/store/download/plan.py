"""What a download must transfer, after looking at the disk: files kept, to verify, to fetch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from model_service.paths import safe_join, validate_relative_file
from model_service.state import FileRecord
from model_service.store.download.files import PartialFile
from model_service.store.download.hub import RemoteFile, RemoteManifest
from model_service.validator import check_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What a job must fetch after looking at the disk."""

    files: tuple[FileRecord, ...]  # the manifest's files, sha256 filled where known
    to_fetch: tuple[RemoteFile, ...]
    # Kept on disk by their size but not known good (the model was not READY): VERIFYING
    # re-hashes them, and fetches again those that fail.
    to_verify: tuple[FileRecord, ...]
    present_bytes: int  # in files kept as they are (to_verify included)
    resumable_bytes: int  # in partial files that will be resumed

    @property
    def needed_bytes(self) -> int:
        """Disk space the transfers still take."""
        return sum(r.size for r in self.to_fetch) - self.resumable_bytes


def make_plan(
    model_dir: Path,
    partial_root: Path,
    manifest: RemoteManifest,
    files: tuple[FileRecord, ...],
    old_files: dict[str, FileRecord],
    trust_sizes: bool,
) -> Plan:
    """Keep files on disk whose size is right: a READY model's unchanged files as they
    are (``trust_sizes``), others to be re-hashed while VERIFYING; remove bad ones; count
    resumable partials (stale ones are removed)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    kept: list[FileRecord] = []
    to_fetch: list[RemoteFile] = []
    to_verify: list[FileRecord] = []
    present = 0
    for remote, record in zip(manifest.files, files, strict=True):
        old = old_files.get(remote.path)
        trusted = trust_sizes and old is not None and _same_blob(old, remote)
        expected = replace(record, sha256=old.sha256) if trusted and old is not None else record
        check = check_file(model_dir, expected, deep=False)
        if check.ok:
            present += remote.size
            kept.append(record)
            if not trusted:
                to_verify.append(record)
            continue
        kept.append(record)
        if check.problem != "missing":
            logger.warning(
                "existing file is bad; fetching it again", extra={"file": remote.path, "problem": check.problem}
            )
            safe_join(model_dir, remote.path).unlink(missing_ok=True)
        to_fetch.append(remote)
    resumable = 0
    for remote in to_fetch:
        partial = PartialFile.for_target(partial_root, Path(validate_relative_file(remote.path)))
        resumable += partial.resumable_bytes(partial.describe(manifest.repo_id, manifest.commit, remote))
    return Plan(tuple(kept), tuple(to_fetch), tuple(to_verify), present, resumable)


def _same_blob(old: FileRecord, remote: RemoteFile) -> bool:
    """The recorded file is the remote one (same size and hash) and its sha256 is known."""
    same_hash = old.sha256 == remote.sha256 or (not remote.sha256 and old.git_oid == remote.git_oid)
    return old.size == remote.size and same_hash and bool(old.sha256)
