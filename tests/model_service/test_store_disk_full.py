"""The store's own disk failing mid-download: a clear status, the source not blamed, the
worker alive, state written again and pulls working once space is back (no restart)."""

from __future__ import annotations

import contextlib
import errno
import json
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.hubserver import HubServer
from tests.model_service.test_store_state_files import two_model_catalog
from tests.support import (
    TEXT_REPO,
    TINY_EN_DIR,
    TINY_REPO,
    StoreProcess,
    partial_size,
    pull,
    sha256,
    start_pull,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb

MODEL_BIN = (TINY_EN_DIR / "model.bin").stat().st_size  # 75 MB
READINESS = pb.DESCRIPTOR.services_by_name["ModelStore"].full_name


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 96 MiB tmpfs: room for tiny.en (75 MB) and the small repo, not for a ballast too."""
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(
            f"cannot mount a tmpfs to fill ({error}); it needs root with CAP_SYS_ADMIN. "
            "test_local_write_error_mid_download_is_not_blamed_on_the_source covers the "
            "write path without it"
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True, timeout=30)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    block = bytes(1 << 20)
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    with contextlib.suppress(OSError), open(path, "ab", buffering=0) as handle:
        while handle.write(b"\0" * 512):  # the last pages
            pass


def readiness(process: StoreProcess) -> int:
    return int(process.health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=5).status)


def source_health(process: StoreProcess) -> list[tuple[int, int, str]]:
    reply = process.stub.ListSources(pb.ListSourcesRequest(), timeout=10)
    return [(s.breaker_state, s.consecutive_failures, s.last_failure_reason) for s in reply.sources]


def test_disk_full_mid_download_keeps_the_source_healthy_and_recovers_without_restart(
    tmp_path: Path, small_fs: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    data_dir = small_fs / "data"
    hub.throttle(8 << 20, path="model.bin")
    catalog = two_model_catalog(tmp_path / "two.yaml")
    store = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)])
    store_processes.append(store)
    store.wait_serving()
    healthy = source_health(store)
    thread, result = start_pull(store, "test-tiny")
    wait_for(lambda: partial_size(data_dir, "test-tiny", "model.bin") > 20_000_000, timeout=60, message="20 MB in")

    ballast = small_fs / "ballast"
    fill(ballast)  # the disk fills ~20 MB into model.bin
    thread.join(60)
    assert not thread.is_alive()
    error = result.get("error")
    assert error is not None, "the pull must fail while the disk is full"
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert error.details().startswith("disk full: "), error.details()
    assert f"MiB free in {data_dir}" in error.details() and "MiB more" in error.details(), error.details()
    # The local disk failed, not the hub: its breaker and counts are as before.
    assert source_health(store) == healthy
    kept = partial_size(data_dir, "test-tiny", "model.bin")
    assert kept > 20_000_000, "the partial file is kept for a resume"
    model = store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"))
    assert model.state == pb.ERROR and model.error_message.startswith("disk full: ")

    # state.json cannot be written now: not ready, but alive and answering.
    wait_for(lambda: readiness(store) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30, message="not ready")
    live = store.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert live.status == health_pb2.HealthCheckResponse.SERVING
    # The download worker is alive: another pull is answered (no space for it either).
    with pytest.raises(grpc.RpcError) as refused:
        pull(store, "test-text", timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value
    assert "disk" in refused.value.details()

    ballast.unlink()
    hub.throttle(None)
    hub.reset_stats()
    wait_for(lambda: readiness(store) == health_pb2.HealthCheckResponse.SERVING, timeout=60, message="ready again")
    assert pull(store, "test-tiny")[-1].state == pb.READY
    ranges = [r.headers.get("Range", "") for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]
    assert ranges == [f"bytes={kept}-"], ranges  # resumed where the disk filled
    assert hub.bytes_served(TINY_REPO, "model.bin") == MODEL_BIN - kept
    assert sha256(data_dir / "models" / "test-tiny" / "model.bin") == sha256(TINY_EN_DIR / "model.bin")
    assert pull(store, "test-text")[-1].state == pb.READY
    assert hub.bytes_served(TEXT_REPO) > 0
    assert source_health(store)[0][:2] == (pb.CLOSED, 0)

    states = {r["model_id"]: r["state"] for r in json.loads((data_dir / "state.json").read_text())["models"]}
    assert states == {"test-tiny": "READY", "test-text": "READY"}
    assert not list(data_dir.glob(".*.tmp")), "a failed state write leaves no temp file"
    messages = [json.loads(line).get("message") for line in store.stderr().splitlines() if line.startswith("{")]
    assert "state file cannot be written; retrying" in messages
    assert "state file written again" in messages


@contextlib.contextmanager
def file_size_limit(nbytes: int) -> Iterator[None]:
    """Processes started inside inherit a soft RLIMIT_FSIZE: writes past it fail with EFBIG."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_local_write_error_mid_download_is_not_blamed_on_the_source(
    tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]
) -> None:
    """No root needed: a file size limit (EFBIG) stands for a filesystem that refuses writes."""
    data_dir = tmp_path / "data"
    catalog = two_model_catalog(tmp_path / "two.yaml")
    with file_size_limit(30 << 20):
        store = StoreProcess(tmp_path, data_dir, hub, extra_args=["--catalog", str(catalog)])
    store_processes.append(store)
    store.wait_serving()
    healthy = source_health(store)

    with pytest.raises(grpc.RpcError) as failed:
        pull(store, "test-tiny", timeout=120)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION, failed.value
    details = failed.value.details()
    assert details.startswith(f"cannot write {data_dir}"), details
    assert "File too large" in details and "model.bin" in details, details
    assert source_health(store) == healthy
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("/model.bin")]
    assert len(gets) == 1, "a local write error is not retried (nor tried on another source)"
    assert 0 < partial_size(data_dir, "test-tiny", "model.bin") <= 30 << 20

    # The worker lives on: a model that fits is pulled without a restart.
    assert pull(store, "test-text")[-1].state == pb.READY
    wait_for(lambda: readiness(store) == health_pb2.HealthCheckResponse.SERVING, timeout=30, message="ready")
