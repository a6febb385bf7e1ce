"""ImportModel reads only inside import_roots (symlinks resolved), says nothing about paths
outside them, and limits how much one import may copy."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.support import TINY_EN_DIR, StoreHandle
from voxserve.modelstore.v1 import modelstore_pb2 as pb


def import_error(store: StoreHandle, model_id: str, source_dir: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        store.stub.ImportModel(pb.ImportModelRequest(model_id=model_id, source_dir=source_dir), timeout=60)
    return caught.value


def test_paths_outside_the_roots_are_refused_alike_whether_they_exist_or_not(
    start_store: Callable[..., StoreHandle], tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    shutil.copytree(TINY_EN_DIR, outside / "tiny")
    allowed.mkdir()
    (allowed / "link").symlink_to(outside / "tiny", target_is_directory=True)
    store = start_store(import_roots=(allowed,))

    refusals = [
        import_error(store, "test-tiny", str(outside / "tiny")),  # exists, outside
        import_error(store, "test-tiny", str(outside / "no-such-dir")),  # does not exist
        import_error(store, "test-tiny", str(allowed / "link")),  # a symlink out of the root
        import_error(store, "test-tiny", str(allowed / ".." / "outside" / "tiny")),  # .. out of the root
        import_error(store, "test-tiny", "/etc"),
    ]
    assert {e.code() for e in refusals} == {grpc.StatusCode.PERMISSION_DENIED}
    assert len({e.details() for e in refusals}) == 1  # one message: it does not tell which exist
    assert str(outside) not in refusals[0].details() and "import_roots" in refusals[0].details()
    assert store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.NOT_DOWNLOADED

    shutil.copytree(TINY_EN_DIR, allowed / "tiny")
    model = store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(allowed / "tiny")))
    assert model.state == pb.READY


def test_embedded_copies_import_with_no_roots(start_store: Callable[..., StoreHandle]) -> None:
    store = start_store(import_roots=())
    model = store.stub.ImportModel(pb.ImportModelRequest(model_id="whisper-tiny.en", source_dir=""), timeout=120)
    assert model.state == pb.READY
    refused = import_error(store, "test-tiny", str(TINY_EN_DIR))
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED


def test_an_import_over_its_file_or_byte_limit_is_resource_exhausted(start_store: Callable[..., StoreHandle]) -> None:
    few_files = start_store(max_import_files=2)
    error = import_error(few_files, "test-tiny", str(TINY_EN_DIR))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_import_files" in error.details()
    few_files.stop()  # one store per data dir

    few_bytes = start_store(max_import_bytes=1 << 20)
    error = import_error(few_bytes, "test-tiny", str(TINY_EN_DIR))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_import_bytes" in error.details()
    assert few_bytes.stub.GetModel(pb.GetModelRequest(model_id="test-tiny")).state == pb.NOT_DOWNLOADED
