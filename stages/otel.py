"""Optional OpenTelemetry export of a stage's spans (``pip install 'parallax-nats[otel]'``).

On when the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(OTLP over HTTP, the SDK's own environment variables for headers, timeouts and so on): every span a
stage records (:mod:`parallax.stages.trace`) is also sent, as a child of the span that sent the
request's message to this stage, so a tracing backend shows the request across gateway and stages.
Without the variable, or without the extra installed, nothing is exported and nothing is imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from parallax.broker.observe import TraceContext

from .trace import Span

log = logging.getLogger(__name__)
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTALL = "pip install 'parallax-nats[otel]'"


class OtelSpans:
    """Sends spans through an OpenTelemetry span exporter (batched, off the caller's thread)."""

    def __init__(self, exporter, service: str = "parallax-stage"):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("parallax.stages")

    def __call__(self, span: Span, parent: TraceContext, labels: Mapping[str, str]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

        remote = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                             trace_flags=TraceFlags(int(parent.flags, 16)))
        attributes = {f"parallax.{k}": v for k, v in labels.items()} | {"parallax.rid": span.rid}
        if span.kind == "compute":
            attributes["parallax.rows"] = span.rows
        otel_span = self.tracer.start_span(span.kind, context=trace.set_span_in_context(NonRecordingSpan(remote)),
                                           start_time=int(span.start * 1e9), attributes=attributes)
        otel_span.end(end_time=int(span.end * 1e9))

    def close(self) -> None:
        """Send what is batched and stop."""
        self.provider.shutdown()


def from_env(environ: Mapping[str, str] = os.environ) -> OtelSpans | None:
    """An OTLP/HTTP export when an endpoint variable is set and the extra is installed, else None."""
    if not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning("%s is set but OpenTelemetry is not installed (%s): spans stay in the stage's ring",
                    next(n for n in ENDPOINT_VARIABLES if environ.get(n)), INSTALL)
        return None
    return OtelSpans(OTLPSpanExporter())
