"""One trace across both services: a Transcribe that auto-pulls its model from the store,
on real processes exporting to a real OTLP receiver; the store's spans are children of the
inference service's, under the caller's trace id."""

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

        def both_arrived(spans: list[ReceivedSpan]) -> bool:
            ours = [s for s in spans if s.trace_id == TRACE_ID]
            return {"voxserve-models", "voxserve-inference"} <= {s.service for s in ours} and any(
                s.name.endswith("/PullModel") for s in ours
            )

        spans = [s for s in receiver.wait_for(both_arrived) if s.trace_id == TRACE_ID]
        by_id = {s.span_id: s for s in spans}
        transcribe = next(s for s in spans if s.name == "/voxserve.inference.v1.Inference/Transcribe")
        assert transcribe.service == "voxserve-inference" and transcribe.parent_span_id == CALLER_SPAN
        pull = next(s for s in spans if s.name == "/voxserve.modelstore.v1.ModelStore/PullModel")
        assert pull.service == "voxserve-models"
        # The store's span hangs under a span of the inference service, inside the Transcribe.
        ancestors = []
        parent = by_id.get(pull.parent_span_id)
        while parent is not None:
            ancestors.append(parent)
            parent = by_id.get(parent.parent_span_id)
        assert ancestors and ancestors[0].service == "voxserve-inference"
        assert transcribe in ancestors
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
