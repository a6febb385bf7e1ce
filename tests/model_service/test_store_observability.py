"""Health, reflection, /metrics, JSON logs with trace ids, graceful shutdown, config errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.hubserver import HubServer
from tests.support import REPO_ROOT, TEXT_REPO, StoreHandle, StoreProcess, text_repo_files
from voxserve.modelstore.v1 import modelstore_pb2 as pb

SERVICE = "voxserve.modelstore.v1.ModelStore"
PULL_METHOD = f"/{SERVICE}/PullModel"
GET_METHOD = f"/{SERVICE}/GetModel"
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_health_and_reflection(store: StoreHandle) -> None:
    health = health_pb2_grpc.HealthStub(store.channel)
    for service in ("", SERVICE):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(store.channel)
    replies = list(
        reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    )
    names = {s.name for s in replies[0].list_services_response.service}
    assert SERVICE in names and "grpc.health.v1.Health" in names


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def test_metrics_endpoint_after_a_pull(start_store: Callable[..., StoreHandle], hub: HubServer) -> None:
    handle = start_store(metrics_port=0)
    endpoint = handle.app.server.metrics_endpoint
    assert endpoint is not None and endpoint.port > 0
    list(handle.stub.PullModel(pb.PullModelRequest(model_id="test-text"), timeout=60))
    with pytest.raises(grpc.RpcError) as info:
        handle.stub.GetModel(pb.GetModelRequest(model_id="no-such-model"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    samples = scrape(endpoint.port)
    total = sum(len(data) for data in text_repo_files().values())
    source = hub.endpoint
    assert value(samples, "voxserve_downloads_started_total", model_id="test-text", source=source) == 1
    assert value(samples, "voxserve_downloads_completed_total", model_id="test-text", source=source) == 1
    assert value(samples, "voxserve_download_bytes_total", model_id="test-text", source=source) == total
    assert value(samples, "voxserve_download_duration_seconds_bucket", model_id="test-text", le="+Inf") == 1
    assert value(samples, "voxserve_download_duration_seconds_count", model_id="test-text") == 1
    assert value(samples, "voxserve_models", state="READY") == 1
    assert value(samples, "voxserve_models", state="NOT_DOWNLOADED") == len(handle.store.catalog.ids()) - 1
    assert value(samples, "voxserve_disk_free_bytes") > 0
    assert value(samples, "voxserve_rpc_requests_total", code="OK", method=PULL_METHOD) == 1
    assert value(samples, "voxserve_rpc_requests_total", code="NOT_FOUND", method=GET_METHOD) == 1
    assert ("voxserve_rpc_requests_total", (("code", "OK"), ("method", GET_METHOD))) not in samples
    assert value(samples, "voxserve_download_queue_length") == 0
    assert hub.bytes_served(TEXT_REPO) == total


def log_lines(stderr: str) -> list[dict]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "the store logged nothing"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from None
    return parsed


def test_json_logs_carry_trace_and_job_ids(tmp_path: Path, hub: HubServer, store_processes: list[StoreProcess]) -> None:
    process = StoreProcess(tmp_path, tmp_path / "data", hub)
    store_processes.append(process)
    process.wait_serving()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    process.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"), metadata=[("traceparent", traceparent)], timeout=10)
    events = list(process.stub.PullModel(pb.PullModelRequest(model_id="test-tiny"), timeout=60))
    assert events[-1].state == pb.READY
    process.process.send_signal(signal.SIGTERM)
    assert process.process.wait(30) == 0

    records = log_lines(process.stderr())
    for record in records:
        assert TIMESTAMP.fullmatch(record.get("timestamp", "")), record
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), record
        assert record["service"] == "model_service", record
        assert record["logger"] and isinstance(record["message"], str), record

    finished = [r for r in records if r["message"] == "rpc finished"]
    get_lines = [r for r in finished if r.get("rpc_method") == GET_METHOD]
    assert len(get_lines) == 1 and get_lines[0]["trace_id"] == trace_id and get_lines[0]["grpc_code"] == "OK"
    pull_lines = [r for r in finished if r.get("rpc_method") == f"/{SERVICE}/PullModel"]
    assert len(pull_lines) == 1 and pull_lines[0]["trace_id"] != trace_id

    steps = ("download queued", "source chosen", "file started", "file finished", "verification passed", "model ready")
    job_ids = set()
    for step in steps:
        lines = [r for r in records if r["message"] == step]
        assert lines, f"no {step!r} line"
        for line in lines:
            assert line.get("model_id") == "test-tiny", line
            assert line.get("job_id"), line
            job_ids.add(line["job_id"])
    assert len(job_ids) == 1
    assert len([r for r in records if r["message"] == "file finished"]) == 4


def test_sigterm_ends_watch_streams_with_unavailable_and_exits_zero(
    tmp_path: Path,
    hub: HubServer,
    store_processes: list[StoreProcess],
) -> None:
    config = tmp_path / "store.yaml"
    config.write_text("grace_seconds: 3\nheartbeat_seconds: 30\n")
    process = StoreProcess(tmp_path, tmp_path / "data", hub, extra_args=["--config", str(config)])
    store_processes.append(process)
    process.wait_serving()
    call = process.stub.WatchModels(pb.WatchModelsRequest(), timeout=60)
    received: list[pb.ModelEvent] = []
    ended: dict = {}
    snapshot_end = threading.Event()

    def read() -> None:
        try:
            for event in call:
                received.append(event)
                if event.type == pb.SNAPSHOT_END:
                    snapshot_end.set()
        except grpc.RpcError as error:
            ended["error"] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert snapshot_end.wait(30)
    process.process.send_signal(signal.SIGTERM)
    reader.join(20)
    assert not reader.is_alive()
    error = ended["error"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    last = received[-1].sequence
    assert f"after_sequence={last}" in error.details()
    assert process.process.wait(20) == 0
    assert "server stopped" in process.stderr()


def run_cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_service", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_errors_exit_2_and_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_downlods: 2\n")
    result = run_cli(["--config", str(bad), "--data-dir", str(tmp_path / "data")])
    assert result.returncode == 2
    assert "max_downlods" in result.stderr
    result = run_cli(["--data-dir", str(tmp_path / "data")], env={"VOXSERVE_PORT": "abc"})
    assert result.returncode == 2
    assert "VOXSERVE_PORT" in result.stderr and "abc" in result.stderr
    assert not (tmp_path / "data").exists()
