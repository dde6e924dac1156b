"""The submit and status subjects and validated JSON submission on LocalBus
(aiwfe.kernel.submitting, aiwfe.kernel.job_status). tests/integration/test_submitting.py
runs these bodies over a real NATS server."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, JSON
from aiwfe.bus.errors import NotAccepted
from aiwfe.kernel import Job, Plugin, Reply, serves
from aiwfe.kernel._external import SUBMITTED
from aiwfe.kernel.errors import BadInput, DeadlineExceeded, TooLarge, Unavailable, from_wire
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.submitting import H_IDEMPOTENCY, H_VALIDATE_ONLY
from tests.support.pods import StartPods
from tests.unit.test_routing import TWO_PODS

JH = {H_CONTENT_TYPE: JSON}


async def request(pod: PodRunner, subject: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    """A JSON request on ``<prefix>.<subject>``; returns the decoded reply or raises its error."""
    bus = pod.bus
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply, rh = await bus.request(f"{bus.prefix}.{subject}", data, {**JH, **(headers or {})}, 10.0)
    if rh and H_ERROR in rh:
        raise from_wire(rh[H_ERROR])
    assert rh is not None and rh.get(H_CONTENT_TYPE) == JSON
    return json.loads(reply)


async def follow(pod: PodRunner, job_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Long-poll the status subject until ``final``; return (last reply, every event)."""
    events: list[dict[str, Any]] = []
    after = 0
    for _ in range(100):
        r = await request(pod, "status.job", {"job_id": job_id, "after_seq": after, "wait_s": 5})
        events += r["events"]
        assert [e["seq"] for e in r["events"]] == sorted(e["seq"] for e in r["events"])
        after = r["last_seq"]
        if r["final"]:
            return r, events
    raise AssertionError("status never final")


async def test_submit_subject_queues_a_valid_json_job_and_status_follows_it(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        r = await request(back, "submit.probe.crunch", {"n": 7})
        job_id = r["job_id"]
        final, events = await follow(back, job_id)
        assert final["status"] == "done" and final["result"]["square"] == 49 and final["error"] is None
        types = [e["type"] for e in events]
        assert types[0] == "probe.progressed" and types[-1] == "job.done"
        assert events[0]["data"] == {"type": "probe.progressed", "n": 7, "step": "started"}
        assert events[-1]["data"]["square"] == 49
        again = await request(back, "status.job", {"job_id": job_id, "after_seq": final["last_seq"]})
        assert again["final"] and again["events"] == [] and again["result"]["square"] == 49


async def test_submit_subject_refuses_bad_input_naming_the_field_and_records_nothing(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        with pytest.raises(BadInput, match=r"Expected `int`, got `str` - at `\$\.n`"):
            await request(back, "submit.probe.crunch", {"n": "seven"}, {H_IDEMPOTENCY: "k1"})
        with pytest.raises(BadInput, match="missing required field `n`"):
            await request(back, "submit.probe.crunch", {}, {H_IDEMPOTENCY: "k1"})
        with pytest.raises(BadInput, match="malformed"):
            await request(back, "submit.probe.crunch", b"{not json")
        with pytest.raises(BadInput, match=H_IDEMPOTENCY):
            await request(back, "submit.probe.crunch", {"n": 1}, {H_IDEMPOTENCY: "k" * 201})
        assert await back.kernel.jobs.owner("nothing") is None
        # nothing was recorded or queued for the refused key: the same key now makes a fresh job
        ok = await request(back, "submit.probe.crunch", {"n": 2}, {H_IDEMPOTENCY: "k1"})
        same = await request(back, "submit.probe.crunch", {"n": 2}, {H_IDEMPOTENCY: "k1"})
        assert ok == same
        final, _ = await follow(back, ok["job_id"])
        assert final["status"] == "done"


async def test_validate_only_and_msgpack_requests(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        assert await request(back, "submit.probe.crunch", {"n": 1}, {H_VALIDATE_ONLY: "1"}) == {"valid": True}
        assert await request(back, "submit.probe.crunch", {"n": 1}, {H_VALIDATE_ONLY: "TRUE"}) == {"valid": True}
        assert "job_id" in await request(back, "submit.probe.crunch", {"n": 1}, {H_VALIDATE_ONLY: "false"})
        with pytest.raises(BadInput, match=H_VALIDATE_ONLY):
            await request(back, "submit.probe.crunch", {"n": 1}, {H_VALIDATE_ONLY: "yes please"})
        with pytest.raises(BadInput, match=r"\$\.n"):
            await request(back, "submit.probe.crunch", {"n": []}, {H_VALIDATE_ONLY: "1"})
        bus = back.bus
        reply, rh = await bus.request(f"{bus.prefix}.submit.probe.crunch", msgspec.msgpack.encode({"n": 3}), None, 10.0)
        assert rh is None or H_ERROR not in rh
        job_id = msgspec.msgpack.decode(reply)["job_id"]
        reply, _ = await bus.request(
            f"{bus.prefix}.status.job", msgspec.msgpack.encode({"job_id": job_id, "wait_s": 5}), None, 10.0
        )
        status = msgspec.msgpack.decode(reply)
        assert status["job_id"] == job_id and status["status"] in ("pending", "done")


async def test_too_large_input_is_refused_before_anything_is_recorded(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        big = json.dumps({"n": 1, "pad": "x" * (back.bus.max_payload() + 10)}).encode()
        with pytest.raises(TooLarge, match="max_payload"):
            await back.kernel.submit_json("probe.crunch", big, idempotency_key="big", owner="alice")
        job_id = back.kernel._job_id("probe.crunch", None, "big")
        assert await back.kernel.job_owner(job_id) is None and await back.kernel.job_record(job_id) is None


async def test_submit_json_validates_locally_and_remotely(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        for pod in (pods["front"], pods["back"]):  # front consumes probe.crunch; back asks front
            with pytest.raises(BadInput, match=r"Expected `int`, got `str` - at `\$\.n`"):
                await pod.kernel.submit_json("probe.crunch", b'{"n": "x"}', owner="alice", idempotency_key="a")
            assert await pod.kernel.job_owner(pod.kernel._job_id("probe.crunch", None, "a")) is None
        with pytest.raises(Unavailable, match=r"no pod consumes job kind probe\.nosuch.*probe\.crunch"):
            await pods["back"].kernel.submit_json("probe.nosuch", b"{}")


async def test_a_failed_enqueue_leaves_no_owner_entry(start_pods: StartPods, monkeypatch: pytest.MonkeyPatch) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel

        async def refuse(*a: Any, **kw: Any) -> bool:
            raise NotAccepted("the stream is down")

        monkeypatch.setattr(k.bus, "enqueue", refuse)
        with pytest.raises(Unavailable, match="the stream is down"):
            await k.submit_json("probe.crunch", b'{"n": 1}', owner="alice", idempotency_key="x")
        assert await k.job_owner(k._job_id("probe.crunch", None, "x")) is None


async def test_an_unconfirmed_enqueue_keeps_the_owner_entry(start_pods: StartPods, monkeypatch: pytest.MonkeyPatch) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel

        async def no_answer(*a: Any, **kw: Any) -> bool:
            raise NotAccepted("no ack in time", uncertain=True)

        monkeypatch.setattr(k.bus, "enqueue", no_answer)
        with pytest.raises(DeadlineExceeded, match="may be queued"):
            await k.submit_json("probe.crunch", b'{"n": 1}', owner="alice", idempotency_key="y")
        # the job may have been stored: its owner must still find it (a resubmission is deduplicated)
        assert await k.job_owner(k._job_id("probe.crunch", None, "y")) == "alice"


async def test_a_caller_cancelled_before_queueing_gives_back_its_slot_and_owner_entry(
    start_pods: StartPods, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission cancelled as it took one of the user's job slots (the create done in the
    bucket, its answer not yet read), before it queued the job, kept both the slot and the owner
    entry, as if the job might be queued: the slot stayed held for its whole lease (1800 s and
    grace) by a job that never existed. A gateway socket closed mid-submit did this
    (tests/integration/test_gateway_leaks.py). Failed every run before."""
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        real_create = k.bus.kv_create
        taken: list[str] = []
        stalled = asyncio.Event()

        async def create_then_stall(key: str, value: bytes) -> bool:
            created = await real_create(key, value)
            if key.startswith("quota."):  # the slot is taken; its answer comes late
                taken.append(key)
                stalled.set()
                await asyncio.sleep(30)
            return created

        monkeypatch.setattr(k.bus, "kv_create", create_then_stall)
        submit = asyncio.get_running_loop().create_task(
            k.submit_json("probe.crunch", b'{"n": 1}', owner="alice", idempotency_key="gone")
        )
        await stalled.wait()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        assert len(taken) == 1
        assert await k.bus.kv_get(taken[0]) is None  # the slot is free again
        assert await k.job_owner(k._job_id("probe.crunch", None, "gone")) is None


async def test_jobs_of_a_kind_no_pod_takes_are_refused(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        assert await k.bus.job_kinds() == ["probe.crunch"]
        with pytest.raises(Unavailable, match="no stream takes this kind"):
            await k.jobs.submit("nosuch.kind", b"{}", {}, "j1")


async def test_status_of_unknown_bad_ids_and_long_poll(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        r = await request(back, "status.job", {"job_id": "nosuchjob"})
        assert r["status"] == "unknown" and r["final"] and r["events"] == []
        for bad in ({"job_id": ">"}, {"job_id": "a.b"}, {"job_id": "x" * 200}, {"job_id": "a", "after_seq": -1}, {}):
            with pytest.raises(BadInput):
                await request(back, "status.job", bad)
        with pytest.raises(BadInput, match="wait_s"):
            await request(back, "status.job", {"job_id": "a", "wait_s": "long"})
        # a gateway user's job is not readable here
        owned = await back.kernel.submit_json("probe.crunch", b'{"n": 1}', owner="alice")
        assert (await request(back, "status.job", {"job_id": owned}))["status"] == "unknown"
        # a long-poll returns as soon as an event arrives
        job_id = (await request(back, "submit.probe.crunch", {"n": 5, "delay_s": 0.3}))["job_id"]
        first = await request(back, "status.job", {"job_id": job_id, "wait_s": 10})
        assert first["status"] in ("pending", "done") and first["events"]
        r = await request(back, "status.job", {"job_id": job_id, "after_seq": first["last_seq"], "wait_s": 10})
        assert r["events"] and r["events"][0]["seq"] > first["last_seq"]


def test_status_replies_are_made_to_fit_one_message() -> None:
    from aiwfe.bus.local import LocalBus
    from aiwfe.kernel.job_status import JobStatus, StatusEvent, StatusReply
    from aiwfe.kernel.jobs import Jobs

    status = JobStatus(Jobs(LocalBus("p", max_payload=20_000)))
    events = [StatusEvent(seq=i, type="x", data="y" * 1000) for i in range(1, 41)]
    body, _ = status._fit(StatusReply(job_id="j", status="done", events=events, last_seq=40, final=True), True)
    out = json.loads(body)
    assert len(body) <= 20_000 - 4096 and not out["final"] and out["last_seq"] == out["events"][-1]["seq"] < 40
    assert [e["seq"] for e in out["events"]] == list(range(1, len(out["events"]) + 1))
    body, _ = status._fit(StatusReply(job_id="j", status="done", result="z" * 30_000, last_seq=3, final=True), False)
    out = msgspec.msgpack.decode(body)
    assert out["result"] is None and out["error"]["type"] == "TooLarge" and out["final"]


async def test_submit_subject_refuses_a_job_over_the_bus_limit(start_pods: StartPods) -> None:
    from aiwfe.bus.local import LocalBus

    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        if not isinstance(back.bus, LocalBus):
            pytest.skip("a NATS server's max_payload is what it is")
        back.bus._max_payload = 300  # smaller than a queued job with its headers
        with pytest.raises(TooLarge, match="max_payload"):
            await request(back, "submit.probe.crunch", {"n": 1}, {H_IDEMPOTENCY: "small-bus"})
        assert await back.kernel.job_owner(back.kernel._job_id("probe.crunch", None, "submit:small-bus")) is None


class Owned(Reply):
    owner: str


class Whose(Job[Owned], tag="edgeprobe.whose"):
    owner: str = ""


class WhosePlugin(Plugin):
    name = "edgeprobe"

    @serves(Whose)
    async def whose(self, job: Whose) -> Owned:
        return Owned(owner=job.owner)


async def test_an_external_publisher_acts_as_no_user(start_pods: StartPods) -> None:
    text = TWO_PODS.replace('"perception", "reasoning"', '"perception", "reasoning", "tests.unit.test_submitting:WhosePlugin"')
    async with start_pods(text) as pods:
        front = pods["front"]
        job_id = (await request(front, "submit.edgeprobe.whose", {"owner": "victim-user-id"}))["job_id"]
        final, _ = await follow(front, job_id)
        assert final["result"] == {"owner": SUBMITTED}


async def test_hostile_requests_always_get_an_answer(start_pods: StartPods) -> None:
    """Random bytes, mangled JSON and odd headers on both subjects: every request is answered
    (a reply or an error header), nothing is queued for a refused one, and the pod still works."""
    import random

    rnd = random.Random(12)
    valid = [b'{"job_id": "abc", "after_seq": 0}', b'{"n": 3}', msgspec.msgpack.encode({"job_id": "x", "wait_s": 0.0})]
    weird = [b"", b"{", b"[]", b"null", b'{"job_id": ">"}', b'{"job_id": "a", "after_seq": 1e400}', b'{"n": 1e400}',
             b'{"job_id": "a", "wait_s": -1}', b'{"n": 1, "type": "other.kind"}', b"\xc1\x02", b"\xff" * 64]  # fmt: skip
    payloads = weird + [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 80))) for _ in range(60)]
    for v in valid:
        for _ in range(20):
            b = bytearray(v)
            for _ in range(rnd.randint(1, 4)):
                b[rnd.randrange(len(b))] = rnd.getrandbits(8)
            payloads.append(bytes(b))
    header_sets = [None, {H_CONTENT_TYPE: JSON}, {H_CONTENT_TYPE: "text/plain"}, {H_IDEMPOTENCY: ""},
                   {"traceparent": "x" * 500}, {H_VALIDATE_ONLY: "1", H_CONTENT_TYPE: JSON}]  # fmt: skip
    async with start_pods(TWO_PODS) as pods:
        back = pods["back"]
        bus = back.bus
        for i, data in enumerate(payloads):
            for subject in ("status.job", "submit.probe.crunch"):
                reply, rh = await bus.request(f"{bus.prefix}.{subject}", data, header_sets[i % len(header_sets)], 10.0)
                assert reply or (rh and H_ERROR in rh), (subject, data)
                if rh and H_ERROR in rh:
                    assert from_wire(rh[H_ERROR]).code in ("bad_input", "overloaded"), (subject, data, rh)
        r = await request(back, "submit.probe.crunch", {"n": 2})
        final, _ = await follow(back, r["job_id"])
        assert final["status"] == "done"


async def test_long_polls_and_submissions_are_bounded_per_pod(start_pods: StartPods) -> None:
    from aiwfe.kernel.errors import Overloaded
    from aiwfe.kernel.job_status import MAX_POLLS

    async with start_pods(TWO_PODS) as pods:
        front = pods["front"]  # the one pod that serves probe.crunch's submit subject
        for pod in pods.values():  # every pod serves status.job: fill them all
            pod.kernel.submissions.status.polls = MAX_POLLS
        with pytest.raises(Overloaded):
            await request(front, "status.job", {"job_id": "abc", "wait_s": 20})
        lim = front.kernel.submissions.limiter
        lim.active, lim.max_queue = lim.limit, 0
        with pytest.raises(Overloaded):
            await request(front, "submit.probe.crunch", {"n": 1})


async def test_long_polls_past_the_waiting_cap_are_answered_at_once(start_pods: StartPods) -> None:
    """MAX_WAITING long-polls wait at once per pod; the next one is answered at once with what
    there is (no client keeps every slot with long-polls), and the counters return to zero."""
    import time

    from aiwfe.kernel.job_status import MAX_WAITING

    async with start_pods(TWO_PODS) as pods:
        front = pods["front"]
        r = await request(front, "submit.probe.crunch", {"n": 2, "delay_s": 30})
        job_id = r["job_id"]
        for pod in pods.values():
            pod.kernel.submissions.status.waiting = MAX_WAITING
        t0 = time.monotonic()
        reply = await request(front, "status.job", {"job_id": job_id, "after_seq": 10**6, "wait_s": 20})
        assert time.monotonic() - t0 < 10, "a long-poll past the cap waited"
        assert reply["status"] == "pending" and reply["events"] == [] and not reply["final"]
        for pod in pods.values():
            st = pod.kernel.submissions.status
            assert st.waiting == MAX_WAITING and st.polls == 0
            st.waiting = 0
        await front.kernel.cancel_job(job_id)
