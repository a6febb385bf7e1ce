"""Spans of the transcription stages (issue 9) on a real server: names, parents, attributes.

The SDK's InMemorySpanExporter is added to the process's tracer provider (installed here if
no test installed one before); every test looks only at the spans of its own trace id,
which it sends in ``traceparent`` metadata.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from model_service.catalog import CatalogEntry
from tests.support import DATA_DIR, InferenceHandle, make_catalog, transcribe, wait_for
from tests.tiny_demucs import export_tiny_demucs_bag
from voxctl.live import live_requests
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve.modelstore.v1 import modelstore_pb2 as store_pb

MULTI = (DATA_DIR / "speech_multi.wav").read_bytes()
SHORT = (DATA_DIR / "speech_short.wav").read_bytes()
MULTI_SECONDS = 25.13
RPC = "/voxserve.inference.v1.Inference/"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider), "another provider was installed first"
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.clear()


class Trace:
    """A trace id to send, and the finished spans that carry it."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self.exporter = exporter
        self.trace_id = uuid.uuid4().hex
        self.metadata = [("traceparent", f"00-{self.trace_id}-00f067aa0ba902b7-01")]

    def spans(self) -> list[ReadableSpan]:
        return [
            s
            for s in self.exporter.get_finished_spans()
            if s.context is not None and format(s.context.trace_id, "032x") == self.trace_id
        ]

    def wait(self, *names: str) -> dict[str, ReadableSpan]:
        """This service's spans by name once all of ``names`` ended, each of them once in the
        trace (inference.model_load comes once per lease; the in-process model store's spans
        share the trace and are left out)."""

        def arrived() -> dict[str, ReadableSpan] | None:
            spans = self.spans()
            found = {s.name for s in spans}
            if not set(names) <= found:
                return None
            for name in names:
                assert [s.name for s in spans].count(name) == 1, f"{name} twice: {sorted(s.name for s in spans)}"
            return {s.name: s for s in spans if s.name.startswith(("inference.", RPC))}  # not the store's

        result: dict[str, ReadableSpan] = wait_for(arrived, timeout=60, message=f"spans {names}")
        return result


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def segments_of(events: list[pb.TranscribeEvent]) -> list[pb.Segment]:
    return [e.segment for e in events if e.WhichOneof("event") == "segment"]


def test_transcribe_has_a_span_per_stage_under_the_rpc_span(
    exporter: InMemorySpanExporter, inference: InferenceHandle
) -> None:
    tr = Trace(exporter)
    events = transcribe(inference, MULTI, metadata=tr.metadata, vad_filter=True, temperature=0.2)
    spans = tr.wait(RPC + "Transcribe", "inference.audio_decode", "inference.vad", "inference.transcription")
    rpc = spans[RPC + "Transcribe"]
    decode, vad, transcription = (spans[f"inference.{n}"] for n in ("audio_decode", "vad", "transcription"))
    for stage in (decode, vad, transcription):
        assert parent_of(stage) == span_id(rpc), f"{stage.name} is not a child of the RPC span"
    assert decode.end_time is not None and vad.start_time is not None and decode.end_time <= vad.start_time

    assert decode.attributes is not None
    assert decode.attributes["voxserve.audio.bytes"] == len(MULTI)
    assert decode.attributes["voxserve.audio.duration_seconds"] == pytest.approx(MULTI_SECONDS, abs=0.05)
    assert decode.attributes["voxserve.audio.sample_rate"] == 16000

    assert vad.attributes is not None
    assert vad.attributes["voxserve.model_id"] == "silero-vad"
    assert int(vad.attributes["voxserve.vad.chunks"]) >= 2  # type: ignore[arg-type]
    assert 5.0 < float(vad.attributes["voxserve.vad.speech_seconds"]) <= MULTI_SECONDS  # type: ignore[arg-type]

    streamed = segments_of(events)
    assert transcription.attributes is not None
    assert transcription.attributes["voxserve.model_id"] == "whisper-tiny.en"
    assert transcription.attributes["voxserve.audio.duration_seconds"] == pytest.approx(MULTI_SECONDS, abs=0.05)
    assert transcription.attributes["voxserve.transcription.segments"] == len(streamed) == events[-1].completed.segments
    assert transcription.attributes["voxserve.transcription.language"] == "en"
    assert transcription.attributes["voxserve.transcription.task"] == "transcribe"
    assert transcription.attributes["voxserve.transcription.temperature"] == pytest.approx(0.2)
    assert transcription.attributes["voxserve.transcription.fast_first_segment"] is False
    marks = [e for e in transcription.events if e.name == "segment"]
    assert [e.attributes["index"] for e in marks if e.attributes] == [s.index for s in streamed]
    for mark, segment in zip(marks, streamed, strict=True):
        assert mark.attributes is not None
        assert mark.attributes["start"] == pytest.approx(segment.start, abs=1e-3)
        assert mark.attributes["end"] == pytest.approx(segment.end, abs=1e-3)


def test_the_first_utterance_span_is_a_child_of_the_transcription_span(
    exporter: InMemorySpanExporter, inference: InferenceHandle
) -> None:
    tr = Trace(exporter)
    events = transcribe(inference, MULTI, metadata=tr.metadata, fast_first_segment=True)
    spans = tr.wait(RPC + "Transcribe", "inference.transcription", "inference.first_utterance")
    transcription, first = spans["inference.transcription"], spans["inference.first_utterance"]
    assert parent_of(transcription) == span_id(spans[RPC + "Transcribe"])
    assert parent_of(first) == span_id(transcription)
    assert "inference.vad" not in spans  # vad_filter was not asked for
    assert first.attributes is not None and first.attributes["voxserve.first_utterance.found"] is True
    streamed = segments_of(events)
    assert float(first.attributes["voxserve.first_utterance.resume_at"]) >= streamed[0].end  # type: ignore[arg-type]
    assert transcription.attributes is not None
    assert transcription.attributes["voxserve.transcription.fast_first_segment"] is True
    assert "voxserve.transcription.temperature" not in transcription.attributes  # unset: the default schedule
    marks = [e.attributes["index"] for e in transcription.events if e.name == "segment" and e.attributes]
    assert marks == list(range(len(streamed)))


def test_separation_span_names_the_demucs_model(
    exporter: InMemorySpanExporter, start_store: Any, start_inference: Any, tmp_path: Path
) -> None:
    bag_dir = tmp_path / "tiny-demucs"
    yaml_path = export_tiny_demucs_bag(bag_dir)
    catalog = make_catalog()
    catalog["tiny-demucs"] = CatalogEntry(
        "tiny-demucs", "demucs", "test-org/tiny-demucs", "main", ("*.yaml", "*.safetensors"), (yaml_path.name,)
    )
    store = start_store(catalog=catalog, import_embedded=True)
    store.stub.ImportModel(store_pb.ImportModelRequest(model_id="tiny-demucs", source_dir=str(bag_dir)))
    handle = start_inference(store=store)
    tr = Trace(exporter)
    transcribe(handle, SHORT, metadata=tr.metadata, separate_model_id="tiny-demucs")
    spans = tr.wait(RPC + "Transcribe", "inference.audio_decode", "inference.separation", "inference.transcription")
    separation = spans["inference.separation"]
    assert parent_of(separation) == span_id(spans[RPC + "Transcribe"])
    assert separation.attributes is not None
    assert separation.attributes["voxserve.model_id"] == "tiny-demucs"
    decoded = spans["inference.audio_decode"].attributes
    assert decoded is not None
    assert separation.attributes["voxserve.audio.duration_seconds"] == pytest.approx(
        float(decoded["voxserve.audio.duration_seconds"]),  # type: ignore[arg-type]
        abs=0.05,
    )


def test_a_live_stream_has_one_span_with_its_decodes_as_events(
    exporter: InMemorySpanExporter, inference: InferenceHandle
) -> None:
    from inference_service.audio import decode_audio

    samples = decode_audio(SHORT)
    audio = (samples.clip(-1, 1) * 32767).astype("<i2").tobytes()
    config = pb.StreamingConfig(encoding=pb.LINEAR16, sample_rate_hertz=16000, interim_results=True)
    tr = Trace(exporter)
    responses = list(
        inference.stub.StreamingTranscribe(live_requests(config, audio, 8.0), timeout=300, metadata=tr.metadata)
    )
    assert responses[-1].WhichOneof("event") == "completed"
    spans = tr.wait(RPC + "StreamingTranscribe", "inference.live_stream")
    live = spans["inference.live_stream"]
    assert parent_of(live) == span_id(spans[RPC + "StreamingTranscribe"])
    assert live.attributes is not None
    assert live.attributes["voxserve.model_id"] == "whisper-tiny.en"
    assert live.attributes["voxserve.job_id"] == responses[0].job_id
    assert live.attributes["voxserve.live.outcome"] == "completed"
    assert live.attributes["voxserve.audio.duration_seconds"] == pytest.approx(
        responses[-1].completed.audio_seconds, abs=0.01
    )
    finals = [r for r in responses if r.WhichOneof("event") == "result" and r.result.is_final]
    assert live.attributes["voxserve.live.final_results"] == len(finals)
    decodes = [e for e in live.events if e.name == "decode"]
    assert decodes, "no decode event"
    for event in decodes:
        assert event.attributes is not None
        assert float(event.attributes["seconds"]) > 0  # type: ignore[arg-type]
        assert float(event.attributes["lag_seconds"]) >= 0  # type: ignore[arg-type]
    batches = [s for s in exporter.get_finished_spans() if s.name == "inference.decode_batch"]
    assert any(link.context.span_id == span_id(live) for s in batches for link in s.links)


def test_each_decode_batch_is_a_root_span_linked_to_the_jobs_it_served(
    exporter: InMemorySpanExporter, start_inference: Any
) -> None:
    handle: InferenceHandle = start_inference(batch_size=8, batch_window_ms=1000.0)  # waits for every open job
    audio = MULTI  # two jobs of one 25 s window each, the same options: their calls share batches
    traces = [Trace(exporter), Trace(exporter)]
    threads = [
        threading.Thread(target=transcribe, args=(handle, audio), kwargs={"metadata": t.metadata}) for t in traces
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    jobs = {span_id(t.wait("inference.transcription")["inference.transcription"]) for t in traces}
    batches = [s for s in exporter.get_finished_spans() if s.name == "inference.decode_batch"]
    served = [s for s in batches if {link.context.span_id for link in s.links} & jobs]
    assert served, "no batch span links to the jobs"
    for span in served:
        assert span.parent is None  # a root: a batch belongs to no single caller's trace
        assert span.attributes is not None and span.attributes["voxserve.model_id"] == "whisper-tiny.en"
        assert span.attributes["voxserve.batch.op"] in ("encode", "generate")
        assert span.attributes["voxserve.batch.size"] == len(span.links)  # one call per file job
        assert span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time
    assert any({link.context.span_id for link in s.links} == jobs for s in served), "no batch served both jobs"


def test_diarization_span_and_metrics(exporter: InMemorySpanExporter, inference: InferenceHandle) -> None:
    tr = Trace(exporter)
    events = transcribe(inference, SHORT, metadata=tr.metadata, diarize=True, max_speakers=4)
    spans = tr.wait(RPC + "Transcribe", "inference.diarization", "inference.transcription")
    diarization = spans["inference.diarization"]
    assert parent_of(diarization) == span_id(spans[RPC + "Transcribe"])
    assert diarization.end_time is not None and spans["inference.transcription"].start_time is not None
    assert diarization.end_time <= spans["inference.transcription"].start_time
    assert diarization.attributes is not None
    assert diarization.attributes["voxserve.model_id"] == "campplus-diarization"
    assert diarization.attributes["voxserve.diarization.max_speakers"] == 4
    assert diarization.attributes["voxserve.diarization.speakers"] == events[-1].completed.speakers == 1
    assert int(diarization.attributes["voxserve.diarization.turns"]) >= 1  # type: ignore[arg-type]
    registry = inference.app.metrics.registry
    labels = {"model_id": "campplus-diarization"}
    assert registry.get_sample_value("voxserve_diarization_duration_seconds_count", labels) == 1
    assert registry.get_sample_value("voxserve_diarization_speakers_sum", labels) == 1
    assert {s.speaker for s in segments_of(events)} == {"SPEAKER_00"}
