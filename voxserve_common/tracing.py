"""OpenTelemetry set-up and W3C trace-context propagation over gRPC metadata."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

EXPORTERS = ("otlp", "console", "none")

_provider: TracerProvider | None = None


def span_exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters OTEL_TRACES_EXPORTER names (comma-separated; default none).

    ``otlp`` speaks OTLP over gRPC, or over HTTP when OTEL_EXPORTER_OTLP_PROTOCOL (or its
    _TRACES_ variant) is ``http/protobuf``; endpoint, headers, TLS and timeouts come from
    the standard OTEL_EXPORTER_OTLP_* variables, read by the exporter itself.
    """
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {unknown}; use {', '.join(EXPORTERS)}")
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if (protocol or "grpc") == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
        else:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf, not {protocol!r}")
        exporters.append(OTLPSpanExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def setup_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """Install a TracerProvider once per process and return it.

    Spans are always created (so trace ids exist for logs and propagation); they are
    exported only when OTEL_TRACES_EXPORTER names an exporter. OTEL_SERVICE_NAME, when
    set, names the service instead of ``service_name``; sampling follows
    OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the SDK reads them).
    """
    global _provider
    if _provider is not None:
        return _provider
    env = os.environ if environ is None else environ
    attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in span_exporters(env):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Export what is buffered and stop the exporters (at the end of a service's life)."""
    if _provider is not None:
        _provider.shutdown()


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
