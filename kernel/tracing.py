"""OpenTelemetry tracing of kernel calls, jobs and events.

Off unless configured: :func:`configure_from_env` turns it on with an OTLP/HTTP
exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (sampling from
``system.trace_sample_ratio``, parent-based so a trace is kept or dropped whole), and
tests call :func:`configure` with an in-memory exporter. When off, the call path pays one
attribute check.

Every call makes a CLIENT span ``<address> call`` and every handled message a SERVER
span ``<address> handle`` as its child, on the in-process path exactly as over NATS
(where the context travels as W3C ``traceparent`` in the call preamble or the message
headers). Jobs make PRODUCER ``<address> submit`` → CONSUMER ``<address> job`` →
``<address> handle``; events PRODUCER ``<address> publish`` → ``<address> handle``.
So one request through several plugins is one trace whatever the placement.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = ["SpanKind", "configure", "configure_from_env", "current_traceparent", "disable", "enabled", "span"]

_propagator = TraceContextTextMapPropagator()


class _State:
    enabled = False
    tracer: trace.Tracer | None = None
    provider: TracerProvider | None = None


STATE = _State()


def enabled() -> bool:
    """True when spans are being recorded."""
    return STATE.enabled


def configure(service_name: str, *, exporter: SpanExporter, sample_ratio: float = 1.0, batch: bool = False) -> TracerProvider:
    """Turn tracing on with ``exporter``; returns the provider (flush or shut it down when done)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name}), sampler=ParentBased(TraceIdRatioBased(sample_ratio))
    )
    provider.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    STATE.provider = provider
    STATE.tracer = provider.get_tracer("aiwfe.kernel")
    STATE.enabled = True
    return provider


def configure_from_env(service_name: str, sample_ratio: float = 1.0) -> bool:
    """Enable OTLP/HTTP export when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; True if enabled.

    A process that already configured tracing (a test, or an earlier pod in the same
    process) keeps its configuration.
    """
    if STATE.enabled:
        return True
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    configure(service_name, exporter=OTLPSpanExporter(), sample_ratio=sample_ratio, batch=True)
    return True


def disable() -> None:
    """Turn tracing off (flushes and shuts down the provider)."""
    provider = STATE.provider
    STATE.enabled = False
    STATE.tracer = None
    STATE.provider = None
    if provider is not None:
        provider.shutdown()


def current_traceparent() -> str | None:
    """The W3C traceparent of the current span, or None."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


@contextmanager
def span(name: str, kind: SpanKind, traceparent: str | None = None, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
    """A span around a block; ``traceparent`` (from a message) becomes its parent.

    Exceptions are recorded on the span and re-raised.
    """
    tracer = STATE.tracer
    assert tracer is not None
    parent = _propagator.extract({"traceparent": traceparent}) if traceparent else None
    token = otel_context.attach(parent) if parent is not None else None
    try:
        with tracer.start_as_current_span(name, kind=kind, attributes=attributes, record_exception=False) as s:
            try:
                yield s
            except BaseException as e:
                s.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"))
                s.record_exception(e)
                raise
    finally:
        if token is not None:
            otel_context.detach(token)
