"""validator: hashes (sha256 and git blob sha1, as the hub computes them) and file checks against records."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from model_service.errors import DownloadCancelled, UnsafePath
from model_service.state import FileRecord
from model_service.validator import FileHasher, check_file, hash_file
from tests.hubserver import HubServer

CONTENT = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: LFS on the hub
SMALL = b"vocabulary\nline two\n"


def record_of(path: str, data: bytes, required: bool = False, with_sha256: bool = True) -> FileRecord:
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return FileRecord(path, len(data), hashlib.sha256(data).hexdigest() if with_sha256 else "", git, required)


def test_hasher_matches_what_the_hub_reports(hub: HubServer, tmp_path: Path) -> None:
    """The real client's metadata from the loopback hub: blob id for git files, sha256 for LFS."""
    hub.add_repo("unit-org/validator", {"vocab.txt": SMALL, "weights.bin": CONTENT})
    info = HfApi(endpoint=hub.endpoint).model_info("unit-org/validator", files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}

    small = FileHasher(len(SMALL))
    small.update(SMALL)
    assert small.git_sha1.hexdigest() == siblings["vocab.txt"].blob_id

    big = FileHasher(len(CONTENT), git_sha1=False)
    for start in range(0, len(CONTENT), 100_000):
        big.update(memoryview(CONTENT)[start : start + 100_000])
    lfs = siblings["weights.bin"].lfs
    assert lfs is not None and big.sha256.hexdigest() == lfs.sha256
    assert big.size == len(CONTENT)
    with pytest.raises(ValueError):
        big.git_sha1  # noqa: B018 - built without it, asking is an error


def test_hash_file_whole_and_limited(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(CONTENT)

    whole = hash_file(path)
    assert whole.size == len(CONTENT)
    assert whole.sha256.hexdigest() == hashlib.sha256(CONTENT).hexdigest()
    assert whole.git_sha1.hexdigest() == record_of("f.bin", CONTENT).git_oid

    first = hash_file(path, len(CONTENT), limit=1000, git_sha1=False)
    assert first.size == 1000 and first.sha256.hexdigest() == hashlib.sha256(CONTENT[:1000]).hexdigest()


def test_hash_file_stops_when_cancelled(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(CONTENT)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DownloadCancelled):
        hash_file(path, cancel=cancel)


def test_check_file_shallow_and_deep(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "w.bin").write_bytes(CONTENT)
    record = record_of("sub/w.bin", CONTENT, required=True)

    shallow = check_file(tmp_path, record, deep=False)
    assert shallow.ok and shallow.actual_size == len(CONTENT) and shallow.actual_sha256 == ""
    deep = check_file(tmp_path, record, deep=True)
    assert deep.ok and deep.actual_sha256 == record.sha256 == deep.expected_sha256


def test_check_file_reports_each_problem(tmp_path: Path) -> None:
    record = record_of("w.bin", CONTENT)
    missing = check_file(tmp_path, record, deep=False)
    assert (missing.ok, missing.problem) == (False, "missing")

    (tmp_path / "w.bin").write_bytes(CONTENT[:-1])
    resized = check_file(tmp_path, record, deep=False)
    assert not resized.ok and resized.problem == f"size {len(CONTENT) - 1} != expected {len(CONTENT)}"
    assert resized.actual_size == len(CONTENT) - 1

    flipped = bytearray(CONTENT)
    flipped[-1] ^= 0xFF
    (tmp_path / "w.bin").write_bytes(bytes(flipped))
    assert check_file(tmp_path, record, deep=False).ok  # same size: only a deep check can tell
    corrupt = check_file(tmp_path, record, deep=True)
    assert not corrupt.ok and corrupt.problem == "sha256 mismatch"
    assert corrupt.actual_sha256 == hashlib.sha256(bytes(flipped)).hexdigest() != record.sha256

    (tmp_path / "empty.json").write_bytes(b"")
    empty = check_file(tmp_path, FileRecord("empty.json", 0, hashlib.sha256(b"").hexdigest(), "", True), False)
    assert not empty.ok and empty.problem == "required file is empty"
    assert check_file(tmp_path, FileRecord("empty.json", 0, "", "", False), True).ok


def test_check_file_without_sha256_uses_the_git_blob_sha1(tmp_path: Path) -> None:
    record = record_of("vocab.txt", SMALL, with_sha256=False)
    (tmp_path / "vocab.txt").write_bytes(SMALL)
    assert check_file(tmp_path, record, deep=True).ok

    (tmp_path / "vocab.txt").write_bytes(SMALL.upper())
    result = check_file(tmp_path, record, deep=True)
    assert not result.ok and result.problem == "git blob sha1 mismatch"


def test_check_file_refuses_paths_that_leave_the_model_dir(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(CONTENT)
    (model_dir / "link.bin").symlink_to(outside)

    with pytest.raises(UnsafePath):
        check_file(model_dir, record_of("link.bin", CONTENT), deep=True)
    with pytest.raises(UnsafePath):
        check_file(model_dir, record_of("../secret.bin", CONTENT), deep=False)
