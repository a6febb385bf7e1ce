"""What the decode schedulers report about each batch, as metrics and one span per batch."""

from __future__ import annotations

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanContext, Status, StatusCode

from inference_service.engines.batching import BatchReport
from inference_service.metrics import InferenceMetrics

tracer = trace.get_tracer("voxserve.inference")


class BatchTelemetry:
    """The schedulers' observer (called on a scheduler's thread after each CTranslate2 call).

    A batch serves several requests, each with its own trace: its span ``inference.decode_batch``
    is the root of a trace of its own, with a link to the span of every job it served (a file
    job's ``inference.transcription``, a live stream's ``inference.live_stream``).
    """

    def __init__(self, metrics: InferenceMetrics | None = None) -> None:
        self.metrics = metrics

    def batch_done(self, report: BatchReport) -> None:
        if self.metrics is not None:
            self._count(self.metrics, report)
        links = [Link(link) for link in report.links if isinstance(link, SpanContext) and link.is_valid]
        span = tracer.start_span(
            "inference.decode_batch",
            context=otel_context.Context(),  # a root: no caller's trace owns a shared batch
            links=links,
            start_time=report.started_ns,
            attributes={
                "voxserve.model_id": report.model_id,
                "voxserve.batch.op": report.op,
                "voxserve.batch.size": report.size,
                "voxserve.batch.lanes": [lane.name.lower() for lane in report.lanes],
                "voxserve.batch.max_wait_seconds": max(report.waited_seconds, default=0.0),
            },
        )
        if report.error is not None:
            span.set_status(Status(StatusCode.ERROR, report.error))
        span.end(end_time=report.ended_ns)

    def waiting_changed(self, model_id: str, waiting: int) -> None:
        if self.metrics is not None:
            self.metrics.decode_items_waiting.labels(model_id).set(waiting)

    @staticmethod
    def _count(metrics: InferenceMetrics, report: BatchReport) -> None:
        metrics.decode_batch_size.labels(report.model_id, report.op).observe(report.size)
        for lane, waited in zip(report.lanes, report.waited_seconds, strict=True):
            name = lane.name.lower()
            metrics.decode_wait.labels(report.model_id, name).observe(waited)
            if report.error is None:
                metrics.decode_items.labels(report.model_id, report.op, name).inc()
