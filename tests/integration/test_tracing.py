"""One request is one trace, with the same shape under every placement.

Pods run in this process, each with its own NATS connection (so calls between pods
cross the server); spans from all of them land in one in-memory exporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import tracing
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from tests.support.probe import Ask, Crunch

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

PROBE = "tests.support.probe:ProbePlugin"
LAYOUTS = {
    "monolith": {"all": [PROBE, "perception", "reasoning"]},
    "consolidated": {"front": [PROBE], "cognitive": ["perception", "reasoning"]},
    "microservices": {"probe": [PROBE], "perception": ["perception"], "reasoning": ["reasoning"]},
}


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    tracing.configure("aiwfe-test", exporter=exp)
    yield exp
    tracing.disable()


@contextlib.asynccontextmanager
async def layout(name: str, nats_url: str, prefix: str) -> AsyncIterator[Kernel]:
    pods = LAYOUTS[name]
    text = f'[system]\nsubject_prefix = "{prefix}"\n' + "".join(
        f"[pods.{pod}]\nplugins = {plugins!r}\n".replace("'", '"') for pod, plugins in pods.items()
    )
    m = parse_manifest(text, env={})
    async with contextlib.AsyncExitStack() as stack:
        for pod in pods:
            await stack.enter_async_context(PodRunner(m, pod, NatsBus(nats_url, prefix, name=pod), ops_port=0))
        client = NatsBus(nats_url, prefix, name="client")
        await client.start()
        stack.push_async_callback(client.close)
        yield Kernel(client)


def tree(spans: list[Any]) -> list[tuple[str, str, str]]:
    """(name, kind, parent name) for every span, sorted: the shape of the trace."""
    by_id = {s.context.span_id: s for s in spans}
    out = []
    for s in spans:
        parent = by_id.get(s.parent.span_id).name if s.parent is not None and s.parent.span_id in by_id else "-"
        out.append((s.name, s.kind.name, parent))
    return sorted(out)


@pytest.mark.parametrize("placement", list(LAYOUTS))
async def test_one_trace_same_shape_under_every_placement(
    placement: str, exporter: InMemorySpanExporter, nats_url: str, prefix: str
) -> None:
    async with layout(placement, nats_url, prefix) as k:
        exporter.clear()
        with tracing.span("request", tracing.SpanKind.INTERNAL):
            await k.call(Ask(text="How fast is the database?", context=["Indexes are fast."]))
        spans = exporter.get_finished_spans()
        assert len({s.context.trace_id for s in spans}) == 1, "one request, one trace"
        assert tree(spans) == [
            ("perception.perceive call", "CLIENT", "probe.ask handle"),
            ("perception.perceive handle", "SERVER", "perception.perceive call"),
            ("probe.ask call", "CLIENT", "request"),
            ("probe.ask handle", "SERVER", "probe.ask call"),
            ("reasoning.reason call", "CLIENT", "probe.ask handle"),
            ("reasoning.reason handle", "SERVER", "reasoning.reason call"),
            ("request", "INTERNAL", "-"),
        ]
        paths = {s.name: s.attributes.get("aiwfe.path") for s in spans if s.kind.name == "CLIENT"}
        if placement == "monolith":
            assert paths["perception.perceive call"] == "local"
        else:
            assert paths["perception.perceive call"] == "remote"

        exporter.clear()
        with tracing.span("submit", tracing.SpanKind.INTERNAL):
            job_id = await k.submit(Crunch(n=3))
        await k.wait_job(job_id, timeout_s=20)
        spans = exporter.get_finished_spans()
        shape = [t for t in tree(spans) if not t[0].startswith("reasoning")]
        assert ("probe.crunch submit", "PRODUCER", "submit") in shape
        assert ("probe.crunch job", "CONSUMER", "probe.crunch submit") in shape
        assert ("probe.crunch handle", "SERVER", "probe.crunch job") in shape
        assert ("reasoning.reason call", "CLIENT", "probe.crunch handle") in tree(spans)
        assert len({s.context.trace_id for s in spans}) == 1
