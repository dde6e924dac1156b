"""Malformed and fuzzed payloads on every subject: never a crash, always an error reply
(requests) or a dead letter (jobs), and the pods keep serving."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, JSON, pack_call
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.errors import from_wire
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from tests.support.probe import Ask

pytestmark = [pytest.mark.integration]
T = TypeVar("T")

PLUGINS = ["tests.support.probe:ProbePlugin", "perception", "reasoning"]


class Harness:
    """Pods on a loop of their own in a thread, so hypothesis can drive them synchronously."""

    def __init__(self, nats_url: str, prefix: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.prefix = prefix
        self.m = parse_manifest(
            f'[system]\nsubject_prefix = "{prefix}"\n[pods.all]\nplugins = {PLUGINS!r}\n'.replace("'", '"'), env={}
        )
        self.pod = PodRunner(self.m, "all", NatsBus(nats_url, prefix, name="fuzz-pod"), ops_port=0)
        self.client = NatsBus(nats_url, prefix, name="fuzz-client")
        self.run(self.pod.start())
        self.run(self.client.start())
        self.subjects = sorted(self.pod.kernel.subject(c) for c in self.pod.kernel.endpoints)
        self.jobs = sorted(ep.spec.address for ep in self.pod.kernel.job_endpoints.values())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.run(self.client.close())
        self.run(self.pod.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def harness(nats_url: str) -> Iterator[Harness]:
    import uuid

    h = Harness(nats_url, "fz" + uuid.uuid4().hex[:10])
    yield h
    h.close()


def _request(h: Harness, subject: str, data: bytes, headers: dict[str, str] | None) -> tuple[bytes, dict[str, str] | None]:
    return h.run(h.client.request(subject, data, headers, 5.0))


payloads = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda b: pack_call(5000, b"\x00" * 8, None, b), st.binary(max_size=256)),
    st.builds(lambda b: b"\xc1\x01" + b, st.binary(max_size=64)),  # truncated/odd preambles
    st.builds(
        lambda v: msgspec.msgpack.encode(v),
        st.recursive(
            st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(),
            lambda c: st.lists(c) | st.dictionaries(st.text(), c),
            max_leaves=10,
        ),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=payloads, as_json=st.booleans(), which=st.integers(min_value=0))
def test_fuzzed_requests_get_error_replies(harness: Harness, data: bytes, as_json: bool, which: int) -> None:
    subject = harness.subjects[which % len(harness.subjects)]
    headers = {H_CONTENT_TYPE: JSON} if as_json else None
    reply, rh = _request(harness, subject, data, headers)
    if rh and H_ERROR in rh:
        err = from_wire(rh[H_ERROR])
        assert err.code in ("bad_message", "schema_mismatch", "remote_error", "deadline_exceeded"), err
    else:
        assert reply  # a payload that happens to be valid gets a real reply


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.binary(max_size=256), which=st.integers(min_value=0))
def test_fuzzed_jobs_are_dead_lettered(harness: Harness, data: bytes, which: int) -> None:
    import uuid

    kind = harness.jobs[which % len(harness.jobs)]
    job_id = uuid.uuid4().hex
    k = Kernel(harness.client)
    harness.run(k.jobs.submit(kind, data, {"Nats-Msg-Id": job_id}, job_id))
    rec = harness.run(k.wait_job(job_id, timeout_s=20))
    assert rec.status in ("failed", "done")
    if rec.status == "failed":
        assert rec.error is not None and rec.error["type"] in ("BadMessage", "ValueError", "Flaky")


def test_still_serving_after_the_fuzz(harness: Harness) -> None:
    k = Kernel(harness.client)
    answer = harness.run(k.call(Ask(text="Is the database fast?", context=["The database is fast."])))
    assert answer.answer == "The database is fast."
    assert harness.pod.ready
