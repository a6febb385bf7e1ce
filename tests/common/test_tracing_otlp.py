"""OTLP export: the exporter choice from OTEL_* variables, and a real store process sending
its spans to a real OTLP receiver on loopback, continuing the caller's trace."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from tests.hubserver import HubServer
from tests.otlp_receiver import OtlpReceiver
from tests.support import StoreProcess
from voxserve.modelstore.v1 import modelstore_pb2 as pb
from voxserve_common.tracing import span_exporters

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    server.start()
    yield server
    server.stop()


def test_exporters_follow_the_standard_variables() -> None:
    assert span_exporters({}) == []
    assert span_exporters({"OTEL_TRACES_EXPORTER": "none"}) == []
    (grpc_exporter,) = span_exporters({"OTEL_TRACES_EXPORTER": "otlp"})
    assert isinstance(grpc_exporter, GrpcExporter)
    both = span_exporters({"OTEL_TRACES_EXPORTER": "otlp,console", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert [type(e) for e in both] == [HttpExporter, ConsoleSpanExporter]
    with pytest.raises(ValueError, match="zipkin"):
        span_exporters({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/json"):
        span_exporters({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_store_spans_reach_a_real_otlp_receiver_in_the_callers_trace(
    tmp_path: Path, hub: HubServer, receiver: OtlpReceiver
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "store-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    store = StoreProcess(tmp_path, tmp_path / "data", hub, env=env)
    try:
        store.wait_serving()
        metadata = (("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01"),)
        store.stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30)
        store.stub.GetModel(pb.GetModelRequest(model_id="test-tiny"), metadata=metadata, timeout=30)

        def arrived(spans: list) -> bool:
            return {s.name for s in spans if s.trace_id == TRACE_ID} >= {
                "/voxserve.modelstore.v1.ModelStore/ListModels",
                "/voxserve.modelstore.v1.ModelStore/GetModel",
            }

        spans = [s for s in receiver.wait_for(arrived) if s.trace_id == TRACE_ID]
        assert {s.service for s in spans} == {"store-under-test"}
        assert {s.parent_span_id for s in spans} == {CALLER_SPAN}
        listed = next(s for s in spans if s.name.endswith("/ListModels"))
        assert listed.attributes["rpc.system"] == "grpc"
        assert listed.attributes["rpc.service"] == "voxserve.modelstore.v1.ModelStore"
        assert listed.attributes["rpc.method"] == "ListModels"
    finally:
        if store.process.poll() is None:
            store.process.send_signal(signal.SIGTERM)
            store.process.wait(30)
        store.close()
