"""One trace across both services: a Transcribe that auto-pulls its model from the store,
on real processes exporting to a real OTLP receiver; the store's spans are children of the
inference service's, under the caller's trace id, and the work of each service (queue wait,
manifest, file transfers, verification, model load, audio decode, transcription with its
segment events) hangs under the RPC that caused it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.hubserver import HubServer
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support import DATA_DIR, REPO_ROOT, StoreProcess, free_port, wait_for
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc

TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "10f067aa0ba902b7"


def otel_env(receiver: OtlpReceiver, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def test_transcribe_that_auto_pulls_is_one_trace_across_both_services(tmp_path: Path, hub: HubServer) -> None:
    receiver = OtlpReceiver()
    receiver.start()
    store = StoreProcess(tmp_path, tmp_path / "store", hub, env=otel_env(receiver, "voxserve-models"))
    port = free_port()
    env = {
        **os.environ,
        **otel_env(receiver, "voxserve-inference"),
        "VOXSERVE_PRELOAD": "",
        "VOXSERVE_PIN": "",
        "VOXSERVE_DEFAULT_MODEL": "test-tiny",
    }
    args = [
        sys.executable, "-m", "inference_service", "--port", str(port), "--metrics-port", "-1",
        "--model-store", f"127.0.0.1:{store.port}", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    inference = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        store.wait_serving()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_for(serving, timeout=60, message="inference service SERVING")
        stub = inference_pb2_grpc.InferenceStub(channel)
        metadata = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),)
        audio = (DATA_DIR / "speech_short.wav").read_bytes()
        events = list(stub.Transcribe(pb.TranscribeRequest(audio=audio), metadata=metadata, timeout=180))
        assert events[-1].WhichOneof("event") == "completed"

        work_spans = {
            "model_store.queue_wait",
            "model_store.resolve_manifest",
            "model_store.file_transfer",
            "model_store.verify",
            "inference.model_load",
            "inference.audio_decode",
            "inference.transcription",
        }

        def both_arrived(spans: list[ReceivedSpan]) -> bool:
            ours = [s for s in spans if s.trace_id == TRACE_ID]
            names = {s.name for s in ours}
            return {"voxserve-models", "voxserve-inference"} <= {s.service for s in ours} and (
                "/voxserve.modelstore.v1.ModelStore/PullModel" in names
                and "/voxserve.inference.v1.Inference/Transcribe" in names
                and work_spans <= names
            )

        spans = [s for s in receiver.wait_for(both_arrived) if s.trace_id == TRACE_ID]
        by_id = {s.span_id: s for s in spans}
        transcribe = next(s for s in spans if s.name == "/voxserve.inference.v1.Inference/Transcribe")
        assert transcribe.service == "voxserve-inference" and transcribe.parent_span_id == CALLER_SPAN

        def ancestry(span: ReceivedSpan) -> list[ReceivedSpan]:
            chain = []
            parent = by_id.get(span.parent_span_id)
            while parent is not None:
                chain.append(parent)
                parent = by_id.get(parent.parent_span_id)
            return chain

        # One pull per model the transcription needed (the Whisper model, and the VAD of the fast
        # first segment when the store has it); each hangs under an inference span, inside the Transcribe.
        pulls = [s for s in spans if s.name == "/voxserve.modelstore.v1.ModelStore/PullModel"]
        for pull in pulls:
            assert pull.service == "voxserve-models"
            ancestors = ancestry(pull)
            assert ancestors and ancestors[0].service == "voxserve-inference"
            assert transcribe in ancestors

        store_work = [s for s in spans if s.name.startswith("model_store.")]
        for span in store_work:
            assert span.service == "voxserve-models", span
            assert any(pull in ancestry(span) for pull in pulls), f"{span.name} is not under a PullModel span"
        queued = {s.attributes["voxserve.model_id"] for s in store_work if s.name == "model_store.queue_wait"}
        assert "test-tiny" in queued
        transfers = [s for s in store_work if s.name == "model_store.file_transfer"]
        assert {t.attributes["voxserve.file.path"] for t in transfers} >= {"model.bin", "config.json"}
        assert all(t.attributes["voxserve.file.bytes"] > 0 for t in transfers)
        inference_work = [s for s in spans if s.name.startswith("inference.")]
        for span in inference_work:
            assert span.service == "voxserve-inference", span
            assert transcribe in ancestry(span), f"{span.name} is not under the Transcribe span"
        load = next(s for s in inference_work if s.name == "inference.model_load")
        assert load.attributes["voxserve.model_id"] == "test-tiny" and load.attributes["voxserve.cache.hit"] is False
        transcription = next(s for s in inference_work if s.name == "inference.transcription")
        segments = [e for e in events if e.WhichOneof("event") == "segment"]
        assert transcription.attributes["voxserve.transcription.segments"] == len(segments) > 0
        assert transcription.events.count("segment") == len(segments)
        channel.close()
    finally:
        if inference.poll() is None:
            inference.send_signal(signal.SIGTERM)
            inference.wait(30)
        if store.process.poll() is None:
            store.process.send_signal(signal.SIGTERM)
            store.process.wait(30)
        store.close()
        receiver.stop()
