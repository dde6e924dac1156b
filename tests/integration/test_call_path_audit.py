"""The kernel's request/reply call path under hostile timing (an audit of ``Kernel.call``,
``NatsBus.request``/``serve``/``flush``, ``FastClient.call`` and the handler limiter).

Each test says in its docstring what failed on the code before and how often. Found: a call's
deadline (and its liveness window) started only once its publish returned, so a stalled server
held calls past their deadline and failed live ones as CalleeLost although the callee answered;
nats-py's ``request`` and ``flush`` (``asyncio.wait_for``) dropped a cancellation landing with the
reply or PONG. The storm of cancelled and timed-out calls is a guard (it passed before too), and
a reply over the server's max_payload was lost (now answered TooLarge by ``kernel/serving.py``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest

from aiwfe.bus.errors import BusTimeout
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import Idempotent, Reply, Request, acting_for
from aiwfe.kernel.errors import AiwfeError
from aiwfe.kernel.plugin import HandlerOptions, HandlerSpec
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools.embedded import EmbeddedNats

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("headers", [None, {"Content-Type": "application/json"}], ids=["kernel-call", "with-headers"])
async def test_a_call_times_out_while_its_request_waits_for_a_stalled_server(
    tmp_path: Path, headers: dict[str, str] | None
) -> None:
    """A request whose publish waits for a stalled server (past nats-py's 2 MiB outbound buffer)
    still fails at its deadline. Before, ``FastClient.call`` armed the deadline only once the
    publish returned and nats-py's ``request`` (a request with headers) too: with the server
    stopped the calls never returned (20 calls of 0.5 s all still pending after 3 s, every run)."""
    server = EmbeddedNats(tmp_path / "nats").start()  # the test's own: it is stopped (SIGSTOP)
    bus = NatsBus(server.url, "stall", connect_timeout_s=5, manage_streams=False)
    await bus.start()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    calls = [loop.create_task(bus.request("stall.x", b"x" * 500_000, headers, 0.5)) for _ in range(20)]  # 10 MB
    try:
        done, pending = await asyncio.wait(calls, timeout=3)
        assert not pending, f"{len(pending)} of {len(calls)} calls still waiting 2.5 s past their deadline"
        assert all(isinstance(t.exception(), BusTimeout) for t in done), [t.exception() for t in done]
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        for t in calls:
            t.cancel()
        await asyncio.wait(calls, timeout=10)
        await bus.close()
        server.kill()


class _CancelOnReply(dict[str, "asyncio.Future[Any]"]):
    """A response map that cancels ``victim`` in the loop turn its reply arrives in."""

    victim: asyncio.Task[Any] | None = None

    def __setitem__(self, token: str, fut: asyncio.Future[Any]) -> None:
        super().__setitem__(token, fut)
        fut.add_done_callback(lambda f: self.victim.cancel() if self.victim is not None and not f.cancelled() else None)


@pytest.mark.parametrize("headers", [None, {"Content-Type": "application/json"}], ids=["kernel-call", "with-headers"])
async def test_a_request_cancelled_as_its_reply_arrives_stays_cancelled(
    nats_url: str, prefix: str, headers: dict[str, str] | None
) -> None:
    """A request cancelled in the loop turn its reply arrives in ends cancelled. Before, a request
    with headers (``aiwfe publish``, the gateway's JSON validation through ``submit_json``)
    went through nats-py's ``request``, whose ``asyncio.wait_for`` on Python 3.11 returns the
    reply and drops the cancellation: the task went on as if never cancelled (5 of 5 every run)."""
    bus = NatsBus(nats_url, prefix, name="audit", manage_streams=False)
    await bus.start()
    try:

        async def echo(data: bytes, h: Any) -> tuple[bytes, Any]:
            return data, None

        await bus.serve(f"{prefix}.echo", echo)
        await bus.flush()
        assert bus.nc is not None
        await bus.request(f"{prefix}.echo", b"warm", headers, 5)  # the response mux exists
        hook = _CancelOnReply(bus.nc._resp_map)
        bus.nc._resp_map = hook
        outcomes = []
        for i in range(5):
            task = asyncio.get_running_loop().create_task(bus.request(f"{prefix}.echo", b"%d" % i, headers, 5))
            hook.victim = task
            await asyncio.wait([task], timeout=5)
            hook.victim = None
            outcomes.append("cancelled" if task.cancelled() else repr(task.exception() or task.result()))
        assert outcomes == ["cancelled"] * 5
    finally:
        await bus.close()


class Done(Reply):
    n: int


class Slow(Request[Done], tag="audit.slow"):
    n: int = 0
    sleep_s: float = 0.0


class _SlowPlugin:
    """Sleeps as asked; ``n < 0``: waits until ``-n`` calls run together (a test of the slots)."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0
        self.together = asyncio.Event()

    async def handle(self, req: Slow) -> Done:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if req.n < 0:
                if self.running >= -req.n:
                    self.together.set()
                await self.together.wait()
            await asyncio.sleep(req.sleep_s)
            return Done(n=req.n)
        finally:
            self.running -= 1


async def test_a_storm_of_cancelled_and_timed_out_calls_leaves_every_slot_free(nats_url: str, prefix: str) -> None:
    """Remote calls that time out in the queue, callers cancelled at random, local calls
    cancelled at random and in the turn their deadline fires, from several owners: afterwards
    the limiter holds no slot and no waiter, it never ran more than its concurrency, and it
    still runs ``concurrency`` calls at once."""
    server = NatsBus(nats_url, prefix, name="audit-server", manage_streams=False)
    caller = NatsBus(nats_url, prefix, name="audit-caller", manage_streams=False)
    await server.start()
    await caller.start()
    try:
        plugin = _SlowPlugin()
        opts = HandlerOptions(concurrency=3, max_queue=6, timeout_s=5.0)
        spec = HandlerSpec(plugin="p", method="handle", contract=Slow, address="audit.slow", kind="request", options=opts)
        served = Kernel(server)
        served.add(spec, plugin)  # type: ignore[arg-type]
        ep = served.endpoints[Slow]
        await server.serve(served.subject(Slow), ep.handle_remote)
        await server.flush()
        k = Kernel(caller)
        rng = random.Random(int(os.environ.get("AUDIT_SEED", "7")))
        outcomes: collections.Counter[str] = collections.Counter()
        loop = asyncio.get_running_loop()

        async def one(i: int) -> None:
            with acting_for(f"owner{i % 4}"):
                req = Slow(n=i, sleep_s=rng.choice([0, 0.005, 0.02, 0.05]))
                if i % 2:
                    await k.call(req, timeout_s=rng.choice([0.01, 0.03, 0.1, 0.3]))
                else:
                    await served.call(req, timeout_s=rng.choice([0.01, 0.03, 0.1, 0.3]))

        for _ in range(3):
            tasks = [loop.create_task(one(i)) for i in range(300)]
            for t in tasks:
                if rng.random() < 0.3:
                    loop.call_later(rng.choice([0, 0.001, 0.01, 0.03, 0.1]), t.cancel)
            await asyncio.wait(tasks, timeout=30)
            assert all(t.done() for t in tasks)
            for t in tasks:
                outcomes[type(t.exception()).__name__ if not t.cancelled() else "cancelled"] += 1
        async with asyncio.timeout(10):
            while server._inflight:
                await asyncio.sleep(0.01)
        lim = ep.limiter
        assert (lim.active, lim.waiting, lim._queues, list(lim._turn)) == (0, 0, {}, [])
        assert plugin.peak <= 3
        assert {"NoneType", "cancelled", "DeadlineExceeded", "Overloaded"} <= set(outcomes), outcomes
        together = [k.call(Slow(n=-3), timeout_s=3) for _ in range(3)]
        assert [d.n for d in await asyncio.gather(*together)] == [-3] * 3
    finally:
        await caller.close()
        await server.close()


async def test_a_call_whose_request_waited_for_a_stalled_server_follows_the_callee_from_when_it_left(tmp_path: Path) -> None:
    """The liveness window of a call starts when its request has left, not before its publish
    waited for a stalled server: a callee that answers at once once the server reads again is
    heard. Before, the window ran while the publish waited (past nats-py's 2 MiB buffer), so
    every call whose publish waited more than 2 s failed with CalleeLost (the kernel's PeerLost,
    or a second run of an idempotent call) although the callee answered it: 16 of 20 every run."""
    server = EmbeddedNats(tmp_path / "nats").start()
    callee = NatsBus(server.url, "stall", connect_timeout_s=5, manage_streams=False)
    bus = NatsBus(server.url, "stall", connect_timeout_s=5, manage_streams=False)
    await callee.start()
    await bus.start()
    answered = 0

    async def handler(data: bytes, h: Any) -> tuple[bytes, Any]:
        nonlocal answered
        answered += 1
        return b"ok", None

    await callee.serve("stall.x", handler)
    await callee.flush()
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    calls = [loop.create_task(bus.request("stall.x", b"x" * 500_000, None, 20)) for _ in range(20)]  # 10 MB
    try:
        done, _ = await asyncio.wait(calls, timeout=3)
        sent_before = len(done)  # their requests left before the stall: CalleeLost is right for them
        os.kill(server.proc.pid, signal.SIGCONT)
        await asyncio.wait(calls, timeout=15)
        outcomes = collections.Counter("ok" if not t.exception() else type(t.exception()).__name__ for t in calls)
        assert outcomes["ok"] >= len(calls) - sent_before - 4, (outcomes, sent_before, answered)
        assert outcomes["ok"] >= 8, outcomes
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        for t in calls:
            t.cancel()
        await asyncio.wait(calls, timeout=10)
        await bus.close()
        await callee.close()
        server.kill()


class _CancelOnPong(list["asyncio.Future[Any]"]):
    """nats-py's list of PINGs awaiting their PONG; cancels ``victim`` in the turn the PONG comes."""

    victim: asyncio.Task[Any] | None = None

    def append(self, fut: asyncio.Future[Any]) -> None:
        super().append(fut)
        fut.add_done_callback(lambda f: self.victim.cancel() if self.victim is not None else None)


async def test_a_flush_cancelled_as_its_pong_arrives_stays_cancelled(nats_url: str, prefix: str) -> None:
    """``NatsBus.flush`` (a pod's last step before it says ready) cancelled in the turn its PONG
    arrives ends cancelled. Before, nats-py's ``flush`` waited with ``asyncio.wait_for``, which on
    Python 3.11 returns and drops that cancellation: 5 of 5 flushes returned, every run."""
    bus = NatsBus(nats_url, prefix, name="audit", manage_streams=False)
    await bus.start()
    try:
        assert bus.nc is not None
        hook = _CancelOnPong(bus.nc._pongs)
        bus.nc._pongs = hook
        outcomes = []
        for _ in range(5):
            task = asyncio.get_running_loop().create_task(bus.flush())
            hook.victim = task
            await asyncio.wait([task], timeout=5)
            hook.victim = None
            outcomes.append("cancelled" if task.cancelled() else repr(task.exception()))
        assert outcomes == ["cancelled"] * 5
    finally:
        await bus.close()


class Big(Reply):
    s: str


class AskBig(Request[Big], Idempotent, tag="audit.big"):
    size: int


class _BigPlugin:
    runs = 0

    async def handle(self, req: AskBig) -> Big:
        _BigPlugin.runs += 1
        return Big(s="x" * req.size)


async def test_a_reply_larger_than_the_servers_max_payload_fails_at_once_and_is_not_run_again(nats_url: str, prefix: str) -> None:
    """A handler whose reply exceeds the server's max_payload (1 MB by default): ``NatsBus.serve``
    logs "reply ... lost: MaxPayloadError" and sends nothing, so the caller hears no reply and no
    more heartbeats: CalleeLost after 2 s, the idempotent call run a second time, then PeerLost
    (retryable: a client retries a call that can never succeed) after 4 s. Every run. Now the
    served endpoint knows the bus's max_payload and answers a final TooLarge at once."""
    server = NatsBus(nats_url, prefix, name="audit-server", manage_streams=False)
    caller = NatsBus(nats_url, prefix, name="audit-caller", manage_streams=False)
    await server.start()
    await caller.start()
    try:
        served = Kernel(server)
        served.add(HandlerSpec("p", "handle", AskBig, "audit.big", "request", HandlerOptions()), _BigPlugin())  # type: ignore[arg-type]
        await served.start()  # serves each endpoint, with the bus's max_payload
        await server.flush()
        _BigPlugin.runs = 0
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(AiwfeError) as e:
            await Kernel(caller).call(AskBig(size=1_200_000), timeout_s=20)
        assert (e.value.retryable, _BigPlugin.runs) == (False, 1), e.value
        assert asyncio.get_running_loop().time() - t0 < 1
    finally:
        await caller.close()
        await server.close()
