"""OpenTelemetry set-up and W3C trace-context propagation over gRPC metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

_configured = False


def setup_tracing(service_name: str) -> None:
    """Install a TracerProvider once per process; export per OTEL_TRACES_EXPORTER.

    Spans are always created (so trace ids exist for logs and propagation); they are
    exported only with OTEL_TRACES_EXPORTER=console (no OTLP exporter is bundled).
    """
    global _configured
    if _configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if os.environ.get("OTEL_TRACES_EXPORTER", "none").lower() == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True


def context_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context from gRPC invocation metadata (traceparent, tracestate)."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            continue
        carrier[key.lower()] = value
    return propagate.extract(carrier)


def trace_metadata(extra: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Metadata that continues the current trace in the server being called."""
    carrier: dict[str, str] = dict(extra or {})
    propagate.inject(carrier)
    return list(carrier.items())
