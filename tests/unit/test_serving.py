"""Metadata is untrusted input: every header and preamble field is validated before a
request takes a slot, a bad one is answered with BadMessage naming the field, every slot
taken is released, waits for a slot are bounded by the deadline, and handlers stuck past
their deadline show on metrics and ``/ready`` (aiwfe.kernel.serving, aiwfe.bus.codec).

On LocalBus here; tests/integration/test_serving_nats.py runs the same test bodies over a
real NATS server (it overrides the ``start_pods`` fixture).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import msgspec
import pytest

from aiwfe.bus.codec import (
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_ERROR,
    H_SCHEMA,
    H_TRACE,
)
from aiwfe.kernel import BadMessage, DeadlineExceeded, Job, Plugin, Reply, Request, current_deadline, serves
from aiwfe.kernel._ops import overdue
from aiwfe.kernel.admin import dead_letters
from aiwfe.kernel.contract import schema_hash
from aiwfe.kernel.errors import AiwfeError, from_wire
from aiwfe.kernel.metrics import render
from aiwfe.kernel.pod import PodRunner
from tests.conftest import wait_until
from tests.support.pods import StartPods
from tests.unit.test_bus_codec import TP, preamble


class Opened(Reply):
    remaining_s: float = 0.0


class Gate(Request[Opened], tag="serving.gate"):
    wait: bool = False


class Stubborn(Request[Opened], tag="serving.stubborn"):
    pass


class Tick(Job[Opened], tag="serving.tick"):
    pass


class GatePlugin(Plugin):
    """A handler that waits for a gate (to fill its slots) and one that ignores cancellation."""

    name = "gate"

    def __init__(self, config: Any, kernel: Any) -> None:
        super().__init__(config, kernel)
        self.opened = asyncio.Event()
        self.release = asyncio.Event()

    @serves(Gate, concurrency=2, max_queue=4, timeout_s=5.0)
    async def gate(self, req: Gate) -> Opened:
        if req.wait:
            await self.opened.wait()
        deadline = current_deadline()
        assert deadline is not None
        return Opened(remaining_s=deadline - asyncio.get_running_loop().time())

    @serves(Stubborn, concurrency=2, max_queue=0, timeout_s=0.2)
    async def stubborn(self, req: Stubborn) -> Opened:
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                pass  # the misbehaviour under test: cancellation ignored
        return Opened()

    @serves(Tick, concurrency=2, max_deliver=1)
    async def tick(self, job: Tick) -> Opened:
        return Opened()


ONE_POD = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 2
[pods.serve]
plugins = ["tests.unit.test_serving:GatePlugin"]
"""

TWO_PODS = ONE_POD + '[pods.call]\nplugins = ["perception"]\n'

GATE = msgspec.msgpack.encode(Gate())


def _settled(pod: PodRunner) -> bool:
    """Every limiter of the pod has no slot taken and nobody queued."""
    eps = [*pod.kernel.endpoints.values(), *pod.kernel.job_endpoints.values()]
    return all(ep.limiter.active == 0 and ep.limiter.waiting == 0 for ep in eps)


def _error(rh: dict[str, str] | None) -> AiwfeError | None:
    return from_wire(rh[H_ERROR]) if rh and H_ERROR in rh else None


async def _raw(pod: PodRunner, data: bytes, headers: dict[str, str] | None, address: str = "serving.gate") -> Any:
    return await pod.bus.request(f"{pod.bus.prefix}.{address}", data, headers, 10.0)


# -- served: a bad field gets an error reply, never a leaked slot ---------------------


BAD_HEADERS = [
    {H_DEADLINE: "inf"},
    {H_DEADLINE: "nan"},
    {H_DEADLINE: "-1"},
    {H_DEADLINE: "0"},
    {H_DEADLINE: "1e999"},
    {H_DEADLINE: "soon"},
    {H_CONTENT_TYPE: "text/plain"},
    {H_SCHEMA: "not-a-schema-hash"},
]


async def test_bad_headers_get_bad_message_naming_the_field_and_leak_nothing(start_pods: StartPods) -> None:
    async with start_pods(ONE_POD) as pods:
        pod = pods["serve"]
        for headers in BAD_HEADERS:
            _, rh = await _raw(pod, GATE, headers)
            err = _error(rh)
            assert isinstance(err, BadMessage), (headers, err)
            assert next(iter(headers)) in err.message
        assert _settled(pod)
        assert (await pod.kernel.call(Gate(), timeout_s=5)).remaining_s > 0


async def test_bad_preambles_get_bad_message_and_leak_nothing(start_pods: StartPods) -> None:
    async with start_pods(ONE_POD) as pods:
        pod = pods["serve"]
        raw = bytes.fromhex(schema_hash(Gate))
        for data in (b"\xc1", preamble(version=9), preamble(deadline_ms=0, schema=raw), preamble(schema=raw, jid=b"a.>")):
            err = _error((await _raw(pod, data + GATE, None))[1])
            assert isinstance(err, BadMessage) and "call preamble" in err.message, err
        reply, rh = await _raw(pod, preamble(schema=raw, tp=b"garbage", jid=b"job-1") + GATE, None)
        assert _error(rh) is None and msgspec.msgpack.decode(reply, type=Opened).remaining_s > 0
        assert _settled(pod)


async def test_garbage_traceparent_header_is_ignored(start_pods: StartPods) -> None:
    async with start_pods(ONE_POD) as pods:
        for tp in ("garbage", "x" * 2000, TP):
            reply, rh = await _raw(pods["serve"], GATE, {H_TRACE: tp, H_CONTENT_TYPE: "application/msgpack"})
            assert _error(rh) is None and reply


async def test_a_huge_deadline_is_capped_at_the_handlers_timeout(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        reply, rh = await _raw(pods["serve"], json.dumps({}).encode(), {H_DEADLINE: "1e12", H_CONTENT_TYPE: "application/json"})
        assert _error(rh) is None and 0 < json.loads(reply)["remaining_s"] <= 5.0
        for pod in ("serve", "call"):  # in-process and remote: the same cap
            assert 0 < (await pods[pod].kernel.call(Gate(), timeout_s=3600)).remaining_s <= 5.0
        with pytest.raises(ValueError):
            await pods["serve"].kernel.call(Gate(), timeout_s=float("inf"))
        assert _settled(pods["serve"])


async def test_512_infinite_deadlines_then_a_normal_call_succeeds_at_once(start_pods: StartPods) -> None:
    """The auth.verify incident: each `inf` deadline used to leak a slot for good."""
    async with start_pods(TWO_PODS) as pods:
        pod = pods["serve"]
        replies = await asyncio.gather(*(_raw(pod, GATE, {H_DEADLINE: "inf"}) for _ in range(512)))
        assert all(isinstance(_error(rh), BadMessage) for _, rh in replies)
        assert _settled(pod)
        for caller in ("serve", "call"):
            assert (await pods[caller].kernel.call(Gate(), timeout_s=2)).remaining_s > 0


@pytest.mark.parametrize("caller", ["serve", "call"])  # in-process, remote
async def test_a_caller_waiting_for_a_slot_gets_deadline_exceeded_and_leaves_the_queue(
    start_pods: StartPods, caller: str
) -> None:
    async with start_pods(TWO_PODS) as pods:
        pod = pods["serve"]
        plugin: GatePlugin = pod.plugins["tests.unit.test_serving:GatePlugin"]  # type: ignore[assignment]
        lim = pod.kernel.endpoints[Gate].limiter
        holders = [asyncio.create_task(pod.kernel.call(Gate(wait=True), timeout_s=30)) for _ in range(2)]
        assert await wait_until(lambda: lim.active == 2)
        with pytest.raises(DeadlineExceeded):
            await pods[caller].kernel.call(Gate(), timeout_s=0.2)
        assert await wait_until(lambda: lim.waiting == 0)
        plugin.opened.set()
        await asyncio.gather(*holders)
        assert _settled(pod)


async def _ops(pod: PodRunner, path: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(pod.ops.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(get)


async def test_handlers_stuck_past_their_deadline_show_on_metrics_and_ready(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        pod = pods["serve"]
        plugin: GatePlugin = pod.plugins["tests.unit.test_serving:GatePlugin"]  # type: ignore[assignment]
        calls = [asyncio.create_task(pods["call"].kernel.call(Stubborn(), timeout_s=30))]
        assert await wait_until(lambda: overdue(pod.kernel) == [("serving.stubborn", 1, 2)])
        status, body = await _ops(pod, "/ready")
        assert status == 200 and any("1 of 2 slots" in n for n in json.loads(body)["degraded"])
        assert 'aiwfe_handlers_overdue{contract="serving.stubborn"} 1.0' in render().decode()
        calls.append(asyncio.create_task(pods["call"].kernel.call(Stubborn(), timeout_s=30)))
        assert await wait_until(lambda: overdue(pod.kernel) == [("serving.stubborn", 2, 2)])
        status, body = await _ops(pod, "/ready")
        assert status == 503 and any("all 2 slots" in r for r in json.loads(body)["reasons"])
        plugin.release.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, (DeadlineExceeded, Opened)) for r in results), results
        assert await wait_until(lambda: not overdue(pod.kernel) and _settled(pod))
        assert (await _ops(pod, "/ready"))[0] == 200
        assert 'aiwfe_handlers_overdue{contract="serving.stubborn"} 0.0' in render().decode()


async def test_job_ids_that_are_not_job_ids_are_refused(start_pods: StartPods) -> None:
    async with start_pods(ONE_POD) as pods:
        k = pods["serve"].kernel
        with pytest.raises(ValueError, match="job_id"):
            await k.submit(Tick(), job_id="a.>")
        assert await k.job_record("*") is None and await k.job_owner("a b") is None and not await k.cancel_job(">")
        # a delivery whose Nats-Msg-Id is not a job id (a client publishing to the jobs subject)
        await k.jobs.bus.enqueue("serving.tick", msgspec.msgpack.encode(Tick()), {}, "bad.id.>")
        letters: list[Any] = []

        async def dead() -> bool:
            letters[:] = await dead_letters(k.jobs, "serving.tick")
            return bool(letters)

        assert await wait_until(dead)
        reason = json.loads(letters[0][1]["Aiwfe-Reason"])
        assert reason["type"] == "BadMessage" and "Nats-Msg-Id" in reason["message"]
        assert letters[0][1]["Aiwfe-Job-Id"].startswith("seq")


async def test_a_waiter_cancelled_after_leave_skipped_it_stays_cancelled() -> None:
    """A queued waiter whose future was cancelled, then dropped by leave() before the waiter
    ran again, still ends with CancelledError (not ValueError) and the count stays right."""
    import asyncio

    from aiwfe.kernel.limiter import Limiter

    lim = Limiter("t", 1, 4)
    await lim.enter()
    waiter = asyncio.ensure_future(lim.enter())
    await asyncio.sleep(0)  # queued
    waiter.cancel()
    lim.leave()  # skips the cancelled future and frees the slot
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert lim.active == 0 and lim.waiting == 0


async def test_queued_callers_are_served_by_owner_in_turn() -> None:
    """A released slot goes to the owners with waiters in turn: one owner's queued calls
    delay another owner's by one call each, not by all of them (FIFO within an owner)."""
    import asyncio

    from aiwfe.kernel.limiter import Limiter

    lim = Limiter("t", 1, 16)
    await lim.enter("A")
    order: list[str] = []

    async def wait(name: str, key: str | None) -> None:
        await lim.enter(key)
        order.append(name)

    tasks = [asyncio.ensure_future(wait(f"A{i}", "A")) for i in range(1, 5)]
    tasks += [asyncio.ensure_future(wait("B1", "B")), asyncio.ensure_future(wait("N1", None))]
    await asyncio.sleep(0)
    assert lim.waiting == 6
    for _ in range(6):
        lim.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["A1", "B1", "N1", "A2", "A3", "A4"]
    lim.leave()
    assert lim.active == 0 and lim.waiting == 0


async def test_a_full_queue_refuses_the_owner_with_the_most_waiters() -> None:
    """When the queue is full, an arrival with fewer waiters takes the place of the newest
    waiter of the longest queue (which gets Overloaded); otherwise the arrival is refused."""
    import asyncio

    from aiwfe.kernel.errors import Overloaded
    from aiwfe.kernel.limiter import Limiter

    lim = Limiter("t", 1, 3)
    await lim.enter("A")
    a = [asyncio.ensure_future(lim.enter("A")) for _ in range(3)]
    await asyncio.sleep(0)
    b = asyncio.ensure_future(lim.enter("B"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="fewer came"):
        await a[2]  # the newest of the longest queue made room
    assert lim.waiting == 3
    with pytest.raises(Overloaded, match="retry later"):
        await lim.enter("A")  # A has the most waiters: refused itself
    c = asyncio.ensure_future(lim.enter("C"))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded):
        await a[1]
    with pytest.raises(Overloaded):
        await lim.enter("D")  # every key has one waiter: no one to refuse in its place
    for fut in (a[0], b, c):
        lim.leave()
        await fut
    lim.leave()
    assert lim.active == 0 and lim.waiting == 0
    none = Limiter("t", 1, 0)
    await none.enter()
    with pytest.raises(Overloaded, match="no queue"):
        await none.enter("A")


async def test_a_cancelled_owner_leaves_the_turn() -> None:
    """A cancelled waiter leaves its owner's queue (and the owner the turn when it was its
    last); a slot handed to a waiter cancelled meanwhile is passed on."""
    import asyncio

    from aiwfe.kernel.limiter import Limiter

    lim = Limiter("t", 1, 8)
    await lim.enter()
    b = asyncio.ensure_future(lim.enter("B"))
    a = asyncio.ensure_future(lim.enter("A"))
    await asyncio.sleep(0)
    b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await b
    assert lim.waiting == 1 and list(lim._turn) == ["A"]
    c = asyncio.ensure_future(lim.enter("C"))
    await asyncio.sleep(0)
    lim.leave()  # to A
    a.cancel()  # cancelled after the slot was handed over: A passes it on to C
    with pytest.raises(asyncio.CancelledError):
        await a
    await c
    lim.leave()
    assert lim.active == 0 and lim.waiting == 0 and not lim._turn


async def test_the_reserve_keeps_the_last_free_slots_for_light_owners() -> None:
    """With ``reserve`` r, an owner holding r or more slots waits while r or fewer are free;
    an owner holding fewer takes them at once, also while heavy owners wait."""
    import asyncio

    from aiwfe.kernel.limiter import Limiter

    with pytest.raises(ValueError, match="reserve"):
        Limiter("t", 4, 8, reserve=4)
    lim = Limiter("t", 8, 64, reserve=2)
    for key in ("A", "A", "A", "B", "B", "B"):
        await lim.enter(key)  # 6 of 8 taken: 2 free, the reserve
    heavy = asyncio.ensure_future(lim.enter("A"))
    await asyncio.sleep(0)
    assert not heavy.done() and lim.waiting == 1 and lim.active == 6
    await lim.enter("C")  # a light owner runs at once although A waits
    await lim.enter("C")
    assert lim.active == 8
    lim.leave("C")  # 1 free: A still may not take it
    await asyncio.sleep(0)
    assert not heavy.done() and lim.active == 7
    lim.leave("B")
    lim.leave("B")  # 3 free: more than the reserve, A's waiter goes
    await asyncio.sleep(0)
    assert heavy.done() and lim.active == 6 and lim.waiting == 0
    for key in ("A", "A", "A", "A", "B", "C"):
        lim.leave(key)
    assert lim.active == 0 and not lim._running


async def test_a_release_lets_every_waiting_owner_that_may_take_a_slot_take_one() -> None:
    """With a reserve, one release can make two owners eligible (the next in turn, and the
    leaving owner, now below the reserve): both run, none waits while a slot it may take is
    free, and a new call of an owner does not overtake its own queued one."""
    import asyncio

    from aiwfe.kernel.limiter import Limiter

    lim = Limiter("t", 6, 64, reserve=2)
    for key in ("X", "X", "Y", "Y"):
        await lim.enter(key)  # 2 free: the reserve; X and Y are heavy
    y = asyncio.ensure_future(lim.enter("Y"))
    x = asyncio.ensure_future(lim.enter("X"))
    await asyncio.sleep(0)
    assert not x.done() and not y.done() and lim.waiting == 2
    lim.leave("X")  # 3 free: Y's waiter runs; then X holds 1 (light) and takes one of the 2 left
    await asyncio.sleep(0)
    assert y.done() and x.done() and lim.active == 5 and lim.waiting == 0
    assert lim._running == {"X": 2, "Y": 3}
    for key in ("X", "X", "Y", "Y", "Y"):
        lim.leave(key)
    assert lim.active == 0 and not lim._running
    with pytest.raises(ValueError, match="at least 1"):
        Limiter("t", 0, 8)
