"""A person who raises the level is debugging (issue 16): on real store and inference
processes, `voxctl log-level root DEBUG` set at run time on both, then a pull, a failed
pull and one transcription. The JSON log lines then show each RPC's request fields, the
store's source choice and every hub request, the cache's decision and the job's phases."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.hubserver import HubServer
from tests.support import DATA_DIR, REPO_ROOT, StoreProcess, free_port, wait_for


def voxctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "voxctl", *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )


def records(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def messages(lines: list[dict[str, Any]], level: str = "DEBUG") -> set[str]:
    return {r["message"] for r in lines if r["level"] == level}


def test_debug_set_at_run_time_shows_a_pull_and_a_transcription(tmp_path: Path, hub: HubServer) -> None:
    store = StoreProcess(tmp_path, tmp_path / "store", hub)
    port = free_port()
    inference_log = tmp_path / "inference.stderr"
    env = {**os.environ, "VOXSERVE_PRELOAD": "", "VOXSERVE_PIN": "", "VOXSERVE_DEFAULT_MODEL": "test-tiny"}
    args = [
        sys.executable, "-m", "inference_service", "--port", str(port), "--metrics-port", "-1",
        "--model-store", f"127.0.0.1:{store.port}", "--cache-dir", str(tmp_path / "cache"), "--log-format", "json",
    ]  # fmt: skip
    with open(inference_log, "wb") as stderr:
        inference = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        store.wait_serving()
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def serving() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_for(serving, timeout=60, message="inference service SERVING")
        addresses = ["--store", f"127.0.0.1:{store.port}", "--inference", f"127.0.0.1:{port}"]
        assert not messages(records(store.stderr_path)), "nothing at DEBUG before the level is raised"
        for service in ("store", "inference"):
            changed = voxctl(*addresses, "log-level", "--service", service, "root", "DEBUG")
            assert changed.returncode == 0, changed.stderr

        pulled = voxctl(*addresses, "models", "pull", "test-tiny")
        assert pulled.returncode == 0, pulled.stderr
        failed = voxctl(*addresses, "models", "pull", "test-tiny", "--revision", "no-such-branch")
        assert failed.returncode != 0
        transcribed = voxctl(
            *addresses, "--json", "transcribe", str(DATA_DIR / "speech_short.wav"), "--model", "test-tiny"
        )
        assert transcribed.returncode == 0, transcribed.stderr
        job_id = next(json.loads(line)["job_id"] for line in transcribed.stdout.splitlines() if '"job_id"' in line)
    finally:
        inference.send_signal(signal.SIGTERM)
        store.process.send_signal(signal.SIGTERM)
        inference.wait(60)
        store.process.wait(60)

    store_lines = records(store.stderr_path)
    store_debug = messages(store_lines)
    # Each RPC's request fields; the store's source choice and every HTTP request to the hub.
    pulls = [
        r for r in store_lines if r["message"].startswith("rpc request") and r.get("method", "").endswith("/PullModel")
    ]
    assert len(pulls) >= 2 and any("no-such-branch" in r["message"] for r in pulls)
    assert {"source choice", "hub request", "download planned"} <= store_debug
    hub_requests = [r for r in store_lines if r["message"] == "hub request"]
    assert all(r["url"].startswith(hub.endpoint) and r["seconds"] >= 0 for r in hub_requests)
    assert {r["status"] for r in hub_requests if "no-such-branch" in r["url"]} == {404}  # the failed pull's
    assert sum(r["status"] == 200 and r["bytes"] > 0 for r in hub_requests) >= 2  # manifest and files

    inference_lines = records(inference_log)
    inference_debug = messages(inference_lines)
    transcribes = [
        r for r in inference_lines if r["message"].startswith("rpc request") and "Transcribe" in r.get("method", "")
    ]
    assert transcribes and "bytes>" in transcribes[0]["message"]
    assert "model load planned" in inference_debug  # the cache's decision, with the estimate
    job_phases = [r for r in inference_lines if r["level"] == "DEBUG" and r.get("job_id") == job_id and "phase" in r]
    assert {"audio decoded", "model acquired", "audio transcribed"} <= {r["message"] for r in job_phases}, job_phases
