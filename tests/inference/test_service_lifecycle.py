"""Start-up preloading and pinning, the batched pipeline option, graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, free_port, wait_for
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
