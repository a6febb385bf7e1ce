"""An Inference server that records the routing header of each call and answers minimally: what a
proxy in front of the replicas would see (tests of voxctl and of the gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.inference.v1 import inference_pb2_grpc as pb_grpc
from voxserve_common.routing import MODEL_HEADER

# What a grpc client reports when HAProxy ends a stream whose replica died (no trailers).
CUT = "Stream removed (Data frame with END_STREAM flag received)"


class Recorder(pb_grpc.InferenceServicer):
    """Answers each call minimally and keeps (method, x-voxserve-model values) per call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []
        self.peers: list[str] = []  # the client's address and port per call: a new port, a new connection
        self.cut_first_transcribe = False
        self.refuse_first_transcribe = False  # UNAVAILABLE before any event, as a proxy's 503

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        values = [str(v) for k, v in context.invocation_metadata() if k == MODEL_HEADER]
        self.calls.append((method, values))
        self.peers.append(context.peer())

    def Transcribe(self, request: pb.TranscribeRequest, context: grpc.ServicerContext) -> Iterator[pb.TranscribeEvent]:
        self._record("Transcribe", context)
        if self.refuse_first_transcribe:
            self.refuse_first_transcribe = False
            context.abort(grpc.StatusCode.UNAVAILABLE, "Received http2 header with status: 503")
        job = f"job-{len(self.calls)}"
        yield pb.TranscribeEvent(job_id=job, sequence=1, accepted=pb.Accepted(model_id=request.options.model_id))
        if self.cut_first_transcribe:
            self.cut_first_transcribe = False
            context.abort(grpc.StatusCode.UNKNOWN, CUT)
        yield pb.TranscribeEvent(job_id=job, sequence=2, segment=pb.Segment(index=0, end=1.0, text="hello there"))
        yield pb.TranscribeEvent(job_id=job, sequence=3, completed=pb.Completed(audio_seconds=1.0, segments=1))

    def WatchJob(self, request: pb.WatchJobRequest, context: grpc.ServicerContext) -> Iterator[pb.TranscribeEvent]:
        self._record("WatchJob", context)
        context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} is not known")
        yield pb.TranscribeEvent()  # never reached

    def CancelJob(self, request: pb.CancelJobRequest, context: grpc.ServicerContext) -> pb.CancelJobResponse:
        self._record("CancelJob", context)
        return pb.CancelJobResponse(job_id=request.job_id, state=pb.JOB_CANCELLED)

    def LoadModel(self, request: pb.LoadModelRequest, context: grpc.ServicerContext) -> pb.LoadedModel:
        self._record("LoadModel", context)
        return pb.LoadedModel(model_id=request.model_id)

    def UnloadModel(self, request: pb.UnloadModelRequest, context: grpc.ServicerContext) -> pb.UnloadModelResponse:
        self._record("UnloadModel", context)
        return pb.UnloadModelResponse(model_id=request.model_id, unloaded=True)

    def StreamingTranscribe(
        self, request_iterator: Iterator[pb.StreamingTranscribeRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.StreamingTranscribeResponse]:
        self._record("StreamingTranscribe", context)
        for _ in request_iterator:
            pass
        yield pb.StreamingTranscribeResponse(job_id="live", completed=pb.Completed())


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    """A Recorder on 127.0.0.1 and its address."""
    servicer = Recorder()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)
