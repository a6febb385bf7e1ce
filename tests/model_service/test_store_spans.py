"""Spans for the store's work (issue 9) on a real in-process store and the loopback hub:
queue wait, manifest resolution, one span per file transfer, verification and import, all
children of the RPC span that caused the work, with their attributes; no configured token
or endpoint password in any exported span."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import generate_latest

from model_service.urls import url_without_credentials
from tests.hubserver import HubServer
from tests.support import (
    TEXT_REPO,
    StoreHandle,
    get_model,
    partial_size,
    pull,
    start_pull,
    text_repo_files,
    wait_for,
)
from voxserve.modelstore.v1 import modelstore_pb2 as pb

TOKEN = "hf_" + "Zq7" * 11  # an HF-token-shaped secret configured for the store
PASSWORD = "mirror-pass-4711"  # in the endpoint URL's userinfo
PULL_RPC = "/voxserve.modelstore.v1.ModelStore/PullModel"
IMPORT_RPC = "/voxserve.modelstore.v1.ModelStore/ImportModel"
WORK = ("model_store.queue_wait", "model_store.resolve_manifest", "model_store.file_transfer", "model_store.verify")


class _WhileTesting(SimpleSpanProcessor):
    """Exports only until its test ends (a provider's processors cannot be removed)."""

    active = True

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process finishes from now on, exported in memory. The global
    provider can be set once per process: reuse it if a test already installed one."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    exporter = InMemorySpanExporter()
    processor = _WhileTesting(exporter)
    provider.add_span_processor(processor)
    yield exporter
    processor.active = False
    exporter.clear()


@pytest.fixture
def traced_store(start_store: Callable[..., StoreHandle], hub: HubServer) -> StoreHandle:
    endpoint = hub.endpoint.replace("http://", f"http://voxserve:{PASSWORD}@")
    return start_store(hf_token=TOKEN, hub_endpoints=(f"mirror={endpoint}",))


def finished(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


def rpc_span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    return wait_for(
        lambda: next((s for s in reversed(exporter.get_finished_spans()) if s.name == name), None),
        timeout=30,
        message=f"{name} span",
    )


def wait_for_work(exporter: InMemorySpanExporter, rpc: ReadableSpan, names: Sequence[str]) -> list[ReadableSpan]:
    assert rpc.context is not None
    trace_id = rpc.context.trace_id

    def arrived() -> list[ReadableSpan] | None:
        found = finished(exporter, trace_id)
        return found if set(names) <= {s.name for s in found} else None

    return wait_for(arrived, timeout=30, message=f"spans {names}")


def children_of(parent: ReadableSpan, found: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in found if s.name == name and s.parent is not None and s.parent.span_id == parent.context.span_id]


def everything_recorded(span: ReadableSpan) -> str:
    """All a span carries, as text: name, attributes, events and their attributes, status."""
    parts: list[Any] = [span.name, dict(span.attributes or {}), span.status.description or ""]
    for event in span.events:
        parts.extend([event.name, dict(event.attributes or {})])
    for link in span.links:
        parts.append(dict(link.attributes or {}))
    parts.append(dict(span.resource.attributes))
    return json.dumps(parts, default=str)


def assert_no_secret(exported: list[ReadableSpan]) -> None:
    assert exported
    for span in exported:
        text = everything_recorded(span)
        assert TOKEN not in text and PASSWORD not in text, text


def test_a_pull_produces_its_work_spans_under_the_pull_rpc_span(
    traced_store: StoreHandle, hub: HubServer, spans: InMemorySpanExporter
) -> None:
    events = pull(traced_store, "test-text")
    assert events[-1].state == pb.READY
    # What the store reports of the endpoint has no password either: events, the model,
    # ListSources, the metrics.
    assert {e.source for e in events if e.source} == {hub.endpoint}
    assert traced_store.stub.GetModel(pb.GetModelRequest(model_id="test-text")).source == hub.endpoint
    listed = traced_store.stub.ListSources(pb.ListSourcesRequest()).sources
    assert [(s.name, s.url) for s in listed] == [("mirror", hub.endpoint)]
    metrics = generate_latest(traced_store.store.metrics.registry).decode()
    assert PASSWORD not in metrics and hub.endpoint in metrics
    rpc = rpc_span(spans, PULL_RPC)
    found = wait_for_work(spans, rpc, WORK)
    files = text_repo_files()

    (queue_wait,) = children_of(rpc, found, "model_store.queue_wait")
    assert queue_wait.attributes == {"voxserve.model_id": "test-text", "voxserve.queue.position": 1}

    (manifest,) = children_of(rpc, found, "model_store.resolve_manifest")
    assert manifest.attributes is not None
    assert manifest.attributes["voxserve.model_id"] == "test-text"
    assert manifest.attributes["voxserve.revision"] == "main"
    assert manifest.attributes["voxserve.source"] == "mirror"
    assert manifest.attributes["voxserve.files"] == len(files)
    assert manifest.attributes["voxserve.commit"] == hub.commit(TEXT_REPO)

    transfers = children_of(rpc, found, "model_store.file_transfer")
    assert sorted(str((s.attributes or {})["voxserve.file.path"]) for s in transfers) == sorted(files)
    for span in transfers:
        attributes = span.attributes or {}
        path = str(attributes["voxserve.file.path"])
        assert attributes["voxserve.file.bytes"] == len(files[path])
        assert attributes["voxserve.file.resumed_from"] == 0
        assert attributes["voxserve.file.bytes_fetched"] == len(files[path])
        assert attributes["voxserve.source"] == "mirror"
        assert attributes["url.full"] == hub.endpoint  # the endpoint without its credentials
        assert span.status.status_code == StatusCode.UNSET

    (verify,) = children_of(rpc, found, "model_store.verify")
    assert verify.attributes == {
        "voxserve.files": len(files),
        "voxserve.bytes": sum(len(b) for b in files.values()),
        "voxserve.verify.rehashed_bytes": 0,  # every file was hashed while it was written
    }
    # In the order the work happened, each ending before the next starts.
    ordered = [queue_wait, manifest, *sorted(transfers, key=lambda s: s.start_time or 0), verify]
    for before, after in itertools.pairwise(ordered):
        assert (before.end_time or 0) <= (after.start_time or 0), (before.name, after.name)
    assert_no_secret(found)


def test_a_joined_pull_adds_no_work_spans_the_first_callers_span_has_them(
    traced_store: StoreHandle, hub: HubServer, spans: InMemorySpanExporter
) -> None:
    hub.throttle(1 << 20, path="weights.bin")
    first_thread, first = start_pull(traced_store, "test-text")
    wait_for(lambda: any(e.state == pb.DOWNLOADING for e in first["events"]), message="first pull downloading")
    joined = pull(traced_store, "test-text")
    first_thread.join(60)
    hub.throttle(None)
    assert joined[-1].state == pb.READY and first["events"][-1].state == pb.READY

    rpcs = wait_for(
        lambda: (found := [s for s in spans.get_finished_spans() if s.name == PULL_RPC]) and len(found) == 2 and found,
        timeout=30,
        message="both PullModel spans",
    )
    assert rpcs[0].context is not None and rpcs[1].context is not None
    assert rpcs[0].context.trace_id != rpcs[1].context.trace_id
    by_trace = {
        rpc.context.trace_id: [s for s in spans.get_finished_spans() if s.name in WORK and s.context is not None]
        for rpc in rpcs
        if rpc.context is not None
    }
    owners = {s.context.trace_id for spans_ in by_trace.values() for s in spans_ if s.context is not None}
    assert len(owners) == 1  # every work span belongs to one caller's trace
    (owner,) = [rpc for rpc in rpcs if rpc.context is not None and rpc.context.trace_id in owners]
    found = wait_for_work(spans, owner, WORK)
    assert len(children_of(owner, found, "model_store.file_transfer")) == 3
    assert len(children_of(owner, found, "model_store.queue_wait")) == 1
    # The first caller's: the joined pull started after the first one was downloading.
    first_start = min(s.start_time or 0 for s in rpcs)
    assert (owner.start_time or 0) == first_start


def test_a_failed_transfer_records_the_error_without_secrets(
    traced_store: StoreHandle, hub: HubServer, spans: InMemorySpanExporter
) -> None:
    hub.corrupt_file(TEXT_REPO, "weights.bin", b"\x00" * len(text_repo_files()["weights.bin"]))
    with pytest.raises(grpc.RpcError) as info:
        pull(traced_store, "test-text")
    assert PASSWORD not in (info.value.details() or "")  # nor in the error the caller gets
    rpc = rpc_span(spans, PULL_RPC)
    found = wait_for_work(spans, rpc, ("model_store.file_transfer",))
    failed = [
        s for s in children_of(rpc, found, "model_store.file_transfer") if s.status.status_code == StatusCode.ERROR
    ]
    assert len(failed) == 1
    (span,) = failed
    assert (span.attributes or {})["voxserve.file.path"] == "weights.bin"
    assert span.status.description and "sha256 mismatch" in span.status.description
    exception = next(e for e in span.events if e.name == "exception")
    assert "IntegrityError" in str((exception.attributes or {})["exception.type"])
    assert f"{hub.endpoint}: sha256 mismatch" in str((exception.attributes or {})["exception.message"])
    assert not children_of(rpc, found, "model_store.verify")
    assert_no_secret(spans.get_finished_spans())


def test_import_span_is_a_child_of_the_import_rpc_span(
    traced_store: StoreHandle, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    source = tmp_path / "import-src"
    for name, content in text_repo_files().items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(content)
    request = pb.ImportModelRequest(model_id="test-text", source_dir=str(source))
    assert traced_store.stub.ImportModel(request, timeout=60).state == pb.READY
    rpc = rpc_span(spans, IMPORT_RPC)
    found = wait_for_work(spans, rpc, ("model_store.import",))
    (span,) = children_of(rpc, found, "model_store.import")
    files = text_repo_files()
    assert span.attributes == {
        "voxserve.model_id": "test-text",
        "voxserve.files": len(files),
        "voxserve.bytes": sum(len(b) for b in files.values()),
    }
    assert_no_secret(found)


def test_urls_lose_their_credentials() -> None:
    assert url_without_credentials("https://u:p@hub.example:8443/base?token=x#f") == "https://hub.example:8443/base"
    assert url_without_credentials("http://[::1]:8080/") == "http://[::1]:8080/"
    assert url_without_credentials("https://huggingface.co") == "https://huggingface.co"


def test_a_resumed_download_works_under_the_resume_rpc_span_and_says_where_it_resumed(
    traced_store: StoreHandle, hub: HubServer, spans: InMemorySpanExporter
) -> None:
    hub.throttle(256 << 10, path="weights.bin")
    thread, _ = start_pull(traced_store, "test-text")
    wait_for(
        lambda: partial_size(traced_store.store.data_dir, "test-text", "weights.bin") > 256 << 10,
        message="weights.bin partly downloaded",
    )
    paused = traced_store.stub.PauseDownload(pb.PauseDownloadRequest(model_id="test-text"), timeout=30)
    assert paused.state == pb.PAUSED
    thread.join(30)
    kept = partial_size(traced_store.store.data_dir, "test-text", "weights.bin")
    hub.throttle(None)
    traced_store.stub.ResumeDownload(pb.ResumeDownloadRequest(model_id="test-text"), timeout=30)
    wait_for(lambda: get_model(traced_store, "test-text").state == pb.READY, timeout=60, message="READY")

    resume = rpc_span(spans, "/voxserve.modelstore.v1.ModelStore/ResumeDownload")
    found = wait_for_work(spans, resume, WORK)
    (transfer,) = children_of(resume, found, "model_store.file_transfer")  # only the file left
    assert (transfer.attributes or {})["voxserve.file.path"] == "weights.bin"
    assert (transfer.attributes or {})["voxserve.file.resumed_from"] == kept > 0
    assert len(children_of(resume, found, "model_store.verify")) == 1
    # The paused run's transfer, under the PullModel span, ended with a stop, not an error.
    pull_rpc = rpc_span(spans, PULL_RPC)
    first = wait_for_work(spans, pull_rpc, ("model_store.file_transfer",))
    stopped = [s for s in children_of(pull_rpc, first, "model_store.file_transfer") if s.events]
    assert [e.name for s in stopped for e in s.events] == ["stopped"]
    assert all(s.status.status_code == StatusCode.UNSET for s in stopped)
    assert_no_secret(spans.get_finished_spans())
