"""Untrusted model ids, revisions and file names never escape the store's directory."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from model_service.catalog import CatalogEntry
from model_service.errors import InvalidModelId, UnsafePath
from model_service.paths import safe_join, validate_model_id, validate_relative_file, validate_revision
from tests.support import StoreHandle
from voxserve.modelstore.v1 import modelstore_pb2 as pb

BAD_IDS = ["../etc", "..", "a/b", "/abs", "UPPER", "with space", "a..b", "-lead", "x" * 65, "nul\x00", "é"]


@pytest.mark.parametrize("model_id", BAD_IDS)
def test_bad_model_ids_are_invalid_argument(store: StoreHandle, model_id: str) -> None:
    for call in (
        lambda: store.stub.GetModel(pb.GetModelRequest(model_id=model_id)),
        lambda: list(store.stub.PullModel(pb.PullModelRequest(model_id=model_id), timeout=10)),
        lambda: store.stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id)),
        lambda: store.stub.ImportModel(pb.ImportModelRequest(model_id=model_id, source_dir="/tmp")),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (model_id, info.value.details())
        assert "model_id" in info.value.details()


def test_unknown_and_empty_ids(store: StoreHandle) -> None:
    with pytest.raises(grpc.RpcError) as info:
        store.stub.GetModel(pb.GetModelRequest(model_id="no-such-model"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ListModels" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        store.stub.GetModel(pb.GetModelRequest(model_id=""))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("revision", ["../main", "main/../x", "/main", "a\\b", "rev with space"])
def test_bad_revisions_are_invalid_argument(store: StoreHandle, revision: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(store.stub.PullModel(pb.PullModelRequest(model_id="test-text", revision=revision), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "a\\b", "./a", "a//b", "", "a/", "x\x00"])
def test_unsafe_file_names_rejected(name: str) -> None:
    with pytest.raises(UnsafePath):
        validate_relative_file(name)


def test_validators_accept_real_names() -> None:
    for model_id in ("whisper-tiny.en", "htdemucs_ft", "silero-vad", "whisper-large-v3-turbo"):
        assert validate_model_id(model_id) == model_id
    for revision in ("main", "v1.0", "refs/pr/1", "a" * 40):
        assert validate_revision(revision) == revision
    with pytest.raises(InvalidModelId):
        validate_revision("..")
    assert validate_relative_file("onnx/model.onnx") == "onnx/model.onnx"


def test_safe_join_refuses_symlink_escape(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(UnsafePath):
        safe_join(base, "link/file.bin")
    assert safe_join(base, "dir/file.bin") == base.resolve() / "dir" / "file.bin"


def test_hostile_hub_file_names_write_nothing_outside(start_store, hub, tmp_path: Path) -> None:
    hub.add_repo("evil/repo", {"config.json": b"{}", "../../escape.txt": b"owned"}, allow_unsafe_paths=True)
    handle = start_store(catalog={"evil": CatalogEntry("evil", "whisper", "evil/repo")})
    with pytest.raises(grpc.RpcError) as info:
        list(handle.stub.PullModel(pb.PullModelRequest(model_id="evil"), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsafe file name" in info.value.details()
    escaped = list(tmp_path.rglob("escape.txt"))
    assert escaped == []
    assert handle.stub.GetModel(pb.GetModelRequest(model_id="evil")).state == pb.ERROR


def test_symlinked_model_dir_component_is_refused(store: StoreHandle, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    model_dir = store.store.model_dir("test-text")
    model_dir.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, model_dir / "sub")
    with pytest.raises(grpc.RpcError) as info:
        list(store.stub.PullModel(pb.PullModelRequest(model_id="test-text"), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "symlink" in info.value.details()
    assert list(outside.iterdir()) == []


def test_import_rejects_relative_missing_and_symlinked_sources(store: StoreHandle, tmp_path: Path) -> None:
    with pytest.raises(grpc.RpcError) as info:
        store.stub.ImportModel(pb.ImportModelRequest(model_id="test-text", source_dir="relative/dir"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "absolute" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        store.stub.ImportModel(pb.ImportModelRequest(model_id="test-text", source_dir=str(tmp_path / "nope")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a directory" in info.value.details()
    source = tmp_path / "src"
    source.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    (source / "config.json").symlink_to(secret)
    with pytest.raises(grpc.RpcError) as info:
        store.stub.ImportModel(pb.ImportModelRequest(model_id="test-text", source_dir=str(source)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "symlink" in info.value.details()
    assert not store.store.model_dir("test-text").exists()
