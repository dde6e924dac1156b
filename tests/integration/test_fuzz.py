"""Malformed and fuzzed payloads, headers and preamble fields on every subject: never a
crash, always an error reply (requests) or a dead letter (jobs), never a leaked slot, and
the pods keep serving. Requests go to a pod over NATS and to one on a LocalBus alike."""

from __future__ import annotations

import asyncio
import struct
import threading
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiwfe.bus.codec import (
    H_ATTEMPTS,
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_ERROR,
    H_JOB_ID,
    H_SCHEMA,
    H_TRACE,
    JSON,
    is_job_id,
    pack_call,
)
from aiwfe.bus.local import LocalBus
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import Plugin, serves
from aiwfe.kernel._ops import overdue
from aiwfe.kernel.admin import dead_letters
from aiwfe.kernel.errors import from_wire
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from tests.support.probe import Ask, Progressed
from tests.unit.test_bus_codec import TP

pytestmark = [pytest.mark.integration]
T = TypeVar("T")

PLUGINS = ["tests.support.probe:ProbePlugin", "tests.support.probe:WhoPlugin", "perception", "reasoning", f"{__name__}:EarPlugin"]
ANSWERS = ("bad_message", "schema_mismatch", "remote_error", "deadline_exceeded", "overloaded")


class EarPlugin(Plugin):
    """Subscribes to an event, so that event subjects are fuzzed too."""

    name = "ear"

    @serves(Progressed, concurrency=2, max_queue=8)
    async def heard(self, ev: Progressed) -> None:
        return None


def _valid_body(contract: type) -> dict[str, Any]:
    """A payload that decodes as ``contract`` (its required fields filled in), so that the
    fuzzed metadata reaches the limiter and the handler, not only the decoder."""
    fill = {str: "x", int: 0, float: 0.0, bool: False}
    return {f.encode_name: fill.get(f.type, []) for f in msgspec.structs.fields(contract) if f.required}


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
        self.local = PodRunner(self.m, "all", LocalBus(prefix), ops_port=0)  # the same, in-process
        self.run(self.pod.start())
        self.run(self.client.start())
        self.run(self.local.start())
        self.subjects = sorted(self.pod.kernel.subject(c) for c in self.pod.kernel.endpoints)
        self.schemas = {self.pod.kernel.subject(c): ep.schema for c, ep in self.pod.kernel.endpoints.items()}
        self.valid = {self.pod.kernel.subject(c): _valid_body(c) for c in self.pod.kernel.endpoints}
        self.jobs = sorted(ep.spec.address for ep in self.pod.kernel.job_endpoints.values())
        self.event_subjects = sorted(self.pod.kernel.subject(c) for c in self.pod.kernel.events)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def settled(self) -> bool:
        """No slot taken and nobody queued on any handler of either pod."""
        kernels = (self.pod.kernel, self.local.kernel)
        eps = [ep for k in kernels for ep in (*k.endpoints.values(), *k.job_endpoints.values())]
        eps += [ep for k in kernels for v in k.events.values() for ep in v]
        return all(ep.limiter.active == 0 and ep.limiter.waiting == 0 for ep in eps)

    def close(self) -> None:
        self.run(self.local.stop())
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


# -- adversarial metadata: headers and preamble fields --------------------------------

# Header values a client can send through NATS (printable ASCII: CR/LF would end the header).
_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_deadlines = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "NaN", "-1", "0", "-0", "1e999", "1e308", "1e12", "99999999999999999999", "0.0001"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    _text,
)
_traceparents = st.one_of(st.just(TP), st.just("ff" + TP[2:]), st.just(TP + "-x"), _text, st.just("0" * 4000))
_job_ids = st.one_of(st.sampled_from(["a.b", "*", ">", "a b", "x" * 200, "", "job-1"]), _text)
_headers = st.fixed_dictionaries(
    {},
    optional={
        H_DEADLINE: _deadlines,
        H_CONTENT_TYPE: st.one_of(st.sampled_from([JSON, "application/json; charset=utf-8", "application/msgpack"]), _text),
        H_SCHEMA: st.one_of(st.just("0" * 16), _text),
        H_TRACE: _traceparents,
        H_JOB_ID: _job_ids,
        H_ATTEMPTS: st.one_of(st.sampled_from(["-1", "inf", "1e999"]), _text),
    },
)
_bodies = st.one_of(st.sampled_from([b"", b"\x80", b"{}", b"null", b"\xc1"]), st.binary(max_size=64))


@st.composite
def _preambles(draw: st.DrawFn, schema: str, valid: bytes) -> bytes:
    """A call preamble with any field: version, deadline, schema, traceparent, job id, lengths."""
    tp = draw(st.one_of(st.just(TP.encode()), st.binary(max_size=80), st.just(b"")))
    jid = draw(
        st.one_of(st.sampled_from([b"job-1", b"a.b", b">", b"*", b"a b", b"\x00", b"x" * 129, b""]), st.binary(max_size=40))
    )
    tl = draw(st.one_of(st.just(len(tp)), st.integers(0, 255)))
    jl = draw(st.one_of(st.just(len(jid)), st.integers(0, 255)))
    head = struct.pack(
        "!BBI8sBB",
        0xC1,
        draw(st.one_of(st.just(2), st.integers(0, 255))),
        draw(st.one_of(st.sampled_from([0, 1, 5000, 2**32 - 1]), st.integers(0, 2**32 - 1))),
        draw(st.one_of(st.just(bytes.fromhex(schema)), st.binary(min_size=8, max_size=8))),
        tl,
        jl,
    )
    whole = head + tp + jid + draw(st.just(valid) | _bodies)
    return whole[: draw(st.integers(0, len(whole)))] if draw(st.booleans()) else whole  # sometimes truncated


@st.composite
def _adversarial(draw: st.DrawFn, h: Harness) -> tuple[str, bytes, dict[str, str] | None]:
    subject = draw(st.sampled_from(h.subjects))
    if draw(st.booleans()):
        valid = msgspec.msgpack.encode(h.valid[subject])
        return subject, draw(_preambles(h.schemas[subject], valid)), draw(st.none() | _headers)
    headers = draw(_headers)
    # Half of the bodies decode (in the encoding the headers name), so the metadata is what is wrong.
    if draw(st.booleans()):
        as_json = str(headers.get(H_CONTENT_TYPE, "")).lower().startswith(JSON)
        enc = msgspec.json.encode if as_json else msgspec.msgpack.encode
        return subject, enc(h.valid[subject]), headers
    return subject, draw(_bodies), headers


async def _send_all(bus: Any, msgs: list[tuple[str, bytes, dict[str, str] | None]]) -> list[Any]:
    return await asyncio.gather(*(bus.request(s, d, dict(hd) if hd else None, 35.0) for s, d, hd in msgs))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_adversarial_metadata_is_always_answered_and_leaks_no_slot(harness: Harness, data: st.DataObject) -> None:
    """Any batch of requests with hostile headers and preambles, over NATS and in-process:
    each gets a reply (an error or a result), and afterwards no slot is taken and no queue holds anyone."""
    msgs = data.draw(st.lists(_adversarial(harness), min_size=1, max_size=8))
    for bus in (harness.client, harness.local.bus):
        for reply, rh in harness.run(_send_all(bus, msgs)):
            if rh and H_ERROR in rh:
                assert from_wire(rh[H_ERROR]).code in ANSWERS, rh
            else:
                assert reply
    assert harness.settled()


def test_512_infinite_deadlines_leave_every_handler_free(harness: Harness) -> None:
    """The auth.verify incident on every subject: afterwards a normal call succeeds at once."""
    for bus in (harness.client, harness.local.bus):
        for subject in harness.subjects:
            msgs = [(subject, b"\x80", {H_DEADLINE: "inf"})] * 512
            replies = harness.run(_send_all(bus, msgs))
            assert all(from_wire(rh[H_ERROR]).code == "bad_message" for _, rh in replies)
    assert harness.settled()
    answer = harness.run(Kernel(harness.client).call(Ask(text="Is it fast?", context=["It is fast."]), timeout_s=5))
    assert answer.answer == "It is fast."


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(headers=_headers, body=_bodies, which=st.integers(min_value=0), bad_id=st.sampled_from(["", ".x", " >", "*", "\t"]))
def test_jobs_and_events_with_hostile_headers_end_or_are_dropped(
    harness: Harness, headers: dict[str, str], body: bytes, which: int, bad_id: str
) -> None:
    """Jobs with hostile headers (a job id that is not one included) get an outcome or a dead
    letter, never get stuck; events with them are dropped; control subjects shrug them off."""
    uid = uuid.uuid4().hex
    job_id = uid + bad_id
    kind = harness.jobs[which % len(harness.jobs)]
    headers = {k: v for k, v in headers.items() if k != H_JOB_ID} | {"X-Fuzz-Id": uid}
    k = Kernel(harness.client)
    harness.run(k.jobs.submit(kind, body, {**headers, "Nats-Msg-Id": job_id}, job_id))
    if is_job_id(job_id):
        assert harness.run(k.wait_job(job_id, timeout_s=20)).status in ("failed", "done")
    else:

        async def dead_lettered() -> bool:
            from tests.conftest import wait_until

            async def found() -> bool:
                return any(h.get("X-Fuzz-Id") == uid for _, h in await dead_letters(k.jobs, kind))

            return await wait_until(found, timeout_s=20, every_s=0.1)

        assert harness.run(dead_lettered())
    for subject in harness.event_subjects:
        harness.run(harness.client.publish(subject, body, headers))
        harness.run(harness.local.bus.publish(subject, body, headers))
    # the control plane: a cancel of something that is not a job, a status request with junk
    harness.run(harness.client.publish(f"{harness.prefix}.control.cancel", body, headers))
    statuses = harness.run(harness.client.request_many(f"{harness.prefix}.control.status", body, 0.2))
    assert any(msgspec.json.decode(s)["pod"] == "all" for s in statuses)


def test_still_serving_after_the_fuzz(harness: Harness) -> None:
    k = Kernel(harness.client)
    answer = harness.run(k.call(Ask(text="Is the database fast?", context=["The database is fast."])))
    assert answer.answer == "The database is fast."
    assert harness.pod.ready

    async def settled() -> bool:
        from tests.conftest import wait_until

        return await wait_until(harness.settled)

    assert harness.run(settled())
    assert not overdue(harness.pod.kernel) and not overdue(harness.local.kernel)
