"""The inference service's own copies of models (store_access=fetch): half-copies of killed
fetches are swept at start-up, copies are fsynced before they count, a torn copy is fetched
again, and files that match the store's manifest but do not load are FAILED_PRECONDITION."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from model_service.catalog import WHISPER_FILES, WHISPER_REQUIRED, CatalogEntry
from tests.netfaults import ThrottledProxy
from tests.support import (
    DATA_DIR,
    TINY_EN_DIR,
    TINY_EN_FILES,
    TINY_REPO,
    InferenceHandle,
    InferenceProcess,
    StoreHandle,
    make_catalog,
    sha256,
    transcribe,
    wait_for,
)
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb

SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
MODEL = "whisper-tiny.en"
INFERENCE = "voxserve.inference.v1.Inference"
SERVING = health_pb2.HealthCheckResponse.SERVING


def text_of(events: list[pb.TranscribeEvent]) -> str:
    return " ".join(e.segment.text for e in events if e.WhichOneof("event") == "segment")


def the_copy(cache_dir: Path, model_id: str = MODEL) -> Path:
    (copy,) = [p for p in (cache_dir / model_id).iterdir() if p.is_dir()]
    return copy


def assert_intact(copy: Path) -> None:
    for name in TINY_EN_FILES:
        assert sha256(copy / name) == sha256(TINY_EN_DIR / name), name


@pytest.fixture
def proxy_to(request: pytest.FixtureRequest) -> Iterator[Callable[..., ThrottledProxy]]:
    proxies: list[ThrottledProxy] = []

    def make(port: int, bytes_per_second: int | None = None) -> ThrottledProxy:
        proxy = ThrottledProxy(port, bytes_per_second)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


def staged_bytes(staging: Path) -> int:
    if not staging.is_dir():
        return 0
    return sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())


def test_half_copies_of_killed_fetches_are_removed_at_start_up(
    tmp_path: Path, start_store: Callable[..., StoreHandle], proxy_to: Callable[..., ThrottledProxy]
) -> None:
    """A real inference process killed (SIGKILL) while it copies a model over a slow link leaves a
    half-copy in cache_dir/.staging; the next process removes it before it serves, and copies anew."""
    store = start_store(import_embedded=True)
    proxy = proxy_to(store.app.port, bytes_per_second=2 << 20)  # tiny.en (78 MB) would take ~40 s
    staging = tmp_path / "inference-cache" / ".staging"
    args = ["--store-access", "fetch"]
    first = InferenceProcess(tmp_path, proxy.address, extra_args=args)
    failures: list[grpc.RpcError] = []

    def request() -> None:
        try:
            transcribe(first, SHORT, timeout=300)
        except grpc.RpcError as error:
            failures.append(error)

    try:
        first.wait_status(SERVING, INFERENCE, timeout=120)
        caller = threading.Thread(target=request, daemon=True)
        caller.start()
        wait_for(lambda: staged_bytes(staging) > 1 << 20, timeout=120, message="the copy is under way")
        first.process.kill()
        first.process.wait(30)
        caller.join(60)
    finally:
        first.close()
    assert failures and failures[0].code() == grpc.StatusCode.UNAVAILABLE
    assert staged_bytes(staging) > 1 << 20, "the killed fetch left its half-copy"

    proxy.bytes_per_second = None
    second = InferenceProcess(tmp_path, proxy.address, extra_args=args)
    try:
        second.wait_status(SERVING, INFERENCE, timeout=120)
        assert list(staging.iterdir()) == []
        swept = [r for r in second.records() if r["message"] == "removed half-copies of models left by an earlier run"]
        assert len(swept) == 1 and swept[0]["copies"] == 1 and swept[0]["bytes"] > 1 << 20
        assert "report" in text_of(transcribe(second, SHORT))
        assert list(staging.iterdir()) == []
        assert_intact(the_copy(tmp_path / "inference-cache"))
    finally:
        second.close()


def test_a_copy_is_fsynced_file_by_file_and_directory_by_directory_before_it_counts(
    start_inference: Callable[..., InferenceHandle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file and the manifest marker are on disk before the rename that makes the copy
    complete, and the rename itself is made durable (the parent directory fsynced after it)."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source: Any, target: Any) -> None:
        events.append(("rename", f"{source} -> {target}"))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    cache_dir = tmp_path / "inference-cache"
    handle = start_inference(store_access="fetch")
    assert "report" in text_of(transcribe(handle, SHORT))
    copy = the_copy(cache_dir)
    renames = [i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f" -> {copy}")]
    assert len(renames) == 1
    (rename,) = renames
    staging = events[rename][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:rename] if kind == "fsync"}
    for name in (*TINY_EN_FILES, ".voxserve-manifest.json"):
        assert f"{staging}/{name}" in synced_before, name
    assert staging in synced_before  # the copy's directory entries
    assert ("fsync", str(copy.parent)) in events[rename:]  # the rename


def test_a_truncated_copy_is_fetched_again_at_the_next_start(
    start_inference: Callable[..., InferenceHandle], tmp_path: Path
) -> None:
    """A power cut tore the copy (model.bin cut short); the next start copies it again instead of
    failing every request with INTERNAL "invalid payload size"."""
    cache_dir = tmp_path / "inference-cache"
    first = start_inference(store_access="fetch")
    assert "report" in text_of(transcribe(first, SHORT))
    store = first.store
    first.stop()
    copy = the_copy(cache_dir)
    os.truncate(copy / "model.bin", (copy / "model.bin").stat().st_size // 3)

    second = start_inference(store=store, store_access="fetch")
    assert "report" in text_of(transcribe(second, SHORT))
    assert the_copy(cache_dir) == copy
    assert_intact(copy)


def test_a_load_that_fails_on_a_corrupted_copy_fetches_it_again_and_loads(
    start_inference: Callable[..., InferenceHandle], tmp_path: Path
) -> None:
    """Bytes changed in place (sizes right): the load fails, the sha256 check finds the damage, the
    copy is fetched again and the model loads from it, within the same request."""
    cache_dir = tmp_path / "inference-cache"
    handle = start_inference(store_access="fetch")
    assert "report" in text_of(transcribe(handle, SHORT))
    handle.stub.UnloadModel(pb.UnloadModelRequest(model_id=MODEL))
    loads = handle.stub.GetCacheStats(pb.GetCacheStatsRequest()).loads
    copy = the_copy(cache_dir)
    with open(copy / "model.bin", "r+b") as model_bin:
        model_bin.write(b"\xff" * 64)  # CTranslate2's header: "Unsupported model binary version"

    assert "report" in text_of(transcribe(handle, SHORT))
    assert_intact(the_copy(cache_dir))
    stats = handle.stub.GetCacheStats(pb.GetCacheStatsRequest())
    assert stats.loads == loads + 1  # the model loaded once more, from the copy fetched again


def test_files_that_match_the_manifest_but_do_not_load_are_failed_precondition(
    start_store: Callable[..., StoreHandle], start_inference: Callable[..., InferenceHandle], tmp_path: Path
) -> None:
    """A model the store holds intact that no engine can load: FAILED_PRECONDITION naming the check
    (not INTERNAL); a damaged copy of it is fetched again once, and the failure that remains is the same."""
    broken = tmp_path / "broken-tiny"
    shutil.copytree(TINY_EN_DIR, broken)
    (broken / "model.bin").write_bytes(b"\xff" * (1 << 20))
    catalog = make_catalog()
    catalog["broken-tiny"] = CatalogEntry(
        "broken-tiny", "whisper", TINY_REPO, "main", WHISPER_FILES, WHISPER_REQUIRED, "not a model"
    )
    store = start_store(catalog=catalog, import_embedded=True)
    imported = store.stub.ImportModel(store_pb.ImportModelRequest(model_id="broken-tiny", source_dir=str(broken)))
    assert imported.state == store_pb.READY
    handle = start_inference(store=store, store_access="fetch")

    with pytest.raises(grpc.RpcError) as intact:
        transcribe(handle, SHORT, model_id="broken-tiny")
    assert intact.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = intact.value.details() or ""
    assert "does not load from its cached copy, whose files match the model store's manifest" in details
    assert "voxctl models verify broken-tiny" in details

    copy = the_copy(tmp_path / "inference-cache", "broken-tiny")
    with open(copy / "model.bin", "r+b") as model_bin:
        model_bin.write(b"\x00" * 64)  # damaged, sizes right: found by the sha256 check after the load fails
    with pytest.raises(grpc.RpcError) as again:
        transcribe(handle, SHORT, model_id="broken-tiny")
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not load from a fresh copy whose files match" in (again.value.details() or "")
    assert (copy / "model.bin").read_bytes() == b"\xff" * (1 << 20)  # copied again
