"""Start-up preloading and pinning, the batched pipeline option, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, InferenceProcess, free_port, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc

MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()
TRANSCRIPT = TRANSCRIPTS["speech_multi.wav"]


def test_preload_and_pin_at_start_up_and_failed_preload_is_not_fatal(start_inference) -> None:
    handle = start_inference(preload=("silero-vad", "htdemucs"), pin=("silero-vad",))
    loaded = {m.model_id: m for m in handle.stub.ListLoadedModels(pb.ListLoadedModelsRequest()).models}
    assert set(loaded) == {"silero-vad"}  # htdemucs is not on the loopback hub: logged, not fatal
    assert loaded["silero-vad"].pinned
    events = list(
        handle.stub.Transcribe(pb.TranscribeRequest(audio=(DATA_DIR / "speech_short.wav").read_bytes()), timeout=120)
    )
    assert events[-1].WhichOneof("event") == "completed"


def test_batched_pipeline_option(start_inference) -> None:
    handle: InferenceHandle = start_inference(batched=True, batch_size=4)
    events = list(handle.stub.Transcribe(pb.TranscribeRequest(audio=MULTI), timeout=180))
    text = " ".join(e.segment.text for e in events if e.WhichOneof("event") == "segment").lower()
    expected = set(TRANSCRIPT.lower().replace(".", "").replace(",", "").split())
    found = set(text.replace(".", "").replace(",", "").split())
    assert len(expected & found) >= 0.7 * len(expected), text
    assert events[-1].WhichOneof("event") == "completed"


def test_sigterm_stops_the_inference_service_gracefully(start_store, tmp_path) -> None:
    store = start_store(import_embedded=True)
    port = free_port()
    env = {**os.environ, "VOXSERVE_PRELOAD": "", "VOXSERVE_PIN": "", "VOXSERVE_GRACE_SECONDS": "5"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inference_service",
            "--port",
            str(port),
            "--metrics-port",
            "-1",
            "--model-store",
            store.address,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                return (
                    health.Check(
                        health_pb2.HealthCheckRequest(service="voxserve.inference.v1.Inference"), timeout=1
                    ).status
                    == health_pb2.HealthCheckResponse.SERVING
                )
            except grpc.RpcError:
                return False

        wait_for(serving, timeout=60, message="inference service SERVING")
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Transcribe(pb.TranscribeRequest(audio=MULTI), timeout=120)
        first = next(call)
        assert first.WhichOneof("event") == "accepted"
        process.send_signal(signal.SIGTERM)
        try:
            list(call)
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert process.wait(30) == 0  # inside the 5 s grace period plus start-up slack
        stderr = process.stderr.read() if process.stderr else ""
        messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.startswith("{")]
        assert "shutdown requested" in messages and "server stopped" in messages
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()


def test_sighup_applies_the_cache_limits_from_the_file_and_reports_the_rest(start_store, tmp_path) -> None:
    """A real process: the YAML file changes, SIGHUP, GetCacheStats shows the new limits (an
    idle model left to meet them); a changed setting that is not reloadable is logged as needing a restart."""
    store = start_store(import_embedded=True)
    config = tmp_path / "inference.yaml"
    config.write_text(yaml.safe_dump({"max_models": 3, "memory_budget": "2GiB", "max_running_jobs": 1}))
    inference = InferenceProcess(tmp_path, store.address, extra_args=["--config", str(config)])
    try:
        inference.wait_status(health_pb2.HealthCheckResponse.SERVING, "voxserve.inference.v1.Inference", timeout=120)
        for model_id in ("silero-vad", "whisper-tiny.en"):
            inference.stub.LoadModel(pb.LoadModelRequest(model_id=model_id), timeout=120)
        stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)
        assert (stats.max_models, stats.memory_budget_bytes, stats.loaded_models) == (3, 2 << 30, 2)

        changed = {
            "max_models": 1,
            "memory_budget": "1GiB",
            "max_running_jobs": 2,
            "batch_size": 4,
            "batch_window_ms": 5,
        }
        config.write_text(yaml.safe_dump({**changed, "warmup": False}))
        inference.process.send_signal(signal.SIGHUP)

        def reloaded() -> pb.CacheStats | None:
            stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)
            return stats if (stats.max_models, stats.memory_budget_bytes) == (1, 1 << 30) else None

        stats = wait_for(reloaded, timeout=60, message="the new limits in GetCacheStats")
        assert stats.loaded_models == 1
        loaded = inference.stub.ListLoadedModels(pb.ListLoadedModelsRequest(), timeout=30)
        assert [m.model_id for m in loaded.models] == ["whisper-tiny.en"]  # the LRU idle one left
        record = wait_for(
            lambda: next((r for r in inference.records() if r["message"] == "settings reloaded"), None),
            timeout=30,
            message="the reload record",
        )
        assert set(record["applied"]) == {"max_models", "memory_budget", "warmup", "batch_size", "batch_window_ms"}
        assert record["needs_restart"] == ["max_running_jobs"]
        assert any(
            r["message"] == "some changed settings take effect only after a restart"
            and r["settings"] == ["max_running_jobs"]
            for r in inference.records()
        )

        # A SetCacheLimits since is not undone by a reload that leaves the limits alone.
        inference.stub.SetCacheLimits(pb.SetCacheLimitsRequest(memory_budget="3GiB"), timeout=30)
        config.write_text(yaml.safe_dump({**changed, "warmup": True}))
        inference.process.send_signal(signal.SIGHUP)
        second = wait_for(
            lambda: [r for r in inference.records() if r["message"] == "settings reloaded"][1:],
            timeout=30,
            message="the second reload record",
        )
        assert second[0]["applied"] == ["warmup"]
        stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)
        assert (stats.max_models, stats.memory_budget_bytes) == (1, 3 << 30)

        # A bad value in the file: nothing changes, the running settings stay.
        config.write_text(yaml.safe_dump({"max_models": 0}))
        inference.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: any(
                r["message"] == "settings not reloaded; the running ones stay in force" for r in inference.records()
            ),
            timeout=30,
            message="the refused reload",
        )
        stats = inference.stub.GetCacheStats(pb.GetCacheStatsRequest(), timeout=30)
        assert (stats.max_models, stats.memory_budget_bytes) == (1, 3 << 30)
    finally:
        inference.close()
