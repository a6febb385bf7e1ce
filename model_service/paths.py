"""Validation of untrusted names and joins that cannot leave their base directory."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from model_service.errors import InvalidModelId, UnsafePath
from voxserve_common.client_strings import MODEL_ID_PATTERN, shown

REVISION_PATTERN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._/-]{0,126}[A-Za-z0-9])?$")
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_.+=@-][A-Za-z0-9_.+=@ -]*$")


def validate_model_id(model_id: str) -> str:
    """Return model_id if it is a safe catalog id (lowercase, digits, . _ -), else raise."""
    if not isinstance(model_id, str) or not model_id:
        raise InvalidModelId("model_id is required (e.g. 'whisper-tiny.en'); see ListModels for ids")
    if ".." in model_id or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise InvalidModelId(
            f"invalid model_id {shown(model_id)}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return model_id


def validate_revision(revision: str) -> str:
    """A branch, tag or commit: letters, digits, . _ - /; no '..' and no leading '/'."""
    if ".." in revision or "//" in revision or not REVISION_PATTERN.fullmatch(revision):
        raise InvalidModelId(f"invalid revision {shown(revision)}: expected a branch, tag or 40-hex commit")
    return revision


def validate_repo_id(repo_id: str) -> str:
    if ".." in repo_id or not REPO_ID_PATTERN.fullmatch(repo_id):
        raise InvalidModelId(f"invalid repo_id {repo_id!r}: expected 'owner/name'")
    return repo_id


def validate_relative_file(name: str) -> str:
    """A '/'-separated relative file path from a hub or a request; raise if it could escape."""
    if not isinstance(name, str) or not name or len(name) > 512:
        raise UnsafePath(f"invalid file name {shown(name) if isinstance(name, str) else type(name).__name__}")
    if "\\" in name or "\x00" in name or name.startswith("/"):
        raise UnsafePath(f"unsafe file name {shown(name)}: absolute paths and backslashes are not allowed")
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"unsafe file name {shown(name)}: '.' and '..' components are not allowed")
    for part in parts:
        if not _FILE_PART.fullmatch(part):
            raise UnsafePath(
                f"unsafe file name {shown(name)}: component {shown(part)} has characters outside [A-Za-z0-9_.+=@ -]"
            )
    return name


def safe_join(base: Path, relative: str) -> Path:
    """base / relative, guaranteed to stay inside base even through existing symlinks.

    Raises UnsafePath when the name is unsafe or any existing component is a symlink.
    """
    validate_relative_file(relative)
    base_resolved = base.resolve()
    target = base_resolved.joinpath(*PurePosixPath(relative).parts)
    current = base_resolved
    for part in PurePosixPath(relative).parts:
        current = current / part
        if current.is_symlink():
            raise UnsafePath(f"refusing {relative!r}: {current} is a symlink")
    resolved = Path(os.path.realpath(target))
    if resolved != target or not resolved.is_relative_to(base_resolved):
        raise UnsafePath(f"refusing {relative!r}: it resolves outside {base_resolved}")
    return target


def remove_path(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; absent is fine."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_files_except(directory: Path, keep: set[str]) -> None:
    """Remove files under ``directory`` whose relative '/'-path is not in ``keep``, then empty directories."""
    for path in sorted(directory.rglob("*"), reverse=True):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and relative not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
