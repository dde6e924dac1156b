"""The bus's use of JetStream through nats-py 2.16, audited for lost, duplicated and
wrongly-counted deliveries (after the fetch-surplus fix of ``test_bus_client_audit.py``).

* Deliveries held past the free slots were heartbeated only when one wait for a slot lasted
  a whole period; with short jobs none did, their ack wait ran out and another replica ran
  them again (attempt 2). Every run of the test failed.
* What the open fetch of a stopping pod brought was nak'ed: each job came back as attempt 2
  without having run. Every run failed.
* A replayed job that failed again within two minutes lost its dead letter (the DLQ stream
  dropped it as a duplicate of the one the replay deleted). Every run failed.
* A follower across a server restart: no gap, no repeat, but it resumed only ~20 s later, when
  nats-py's activity check missed two idle heartbeats; the bus now re-creates it on reconnect.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest

from aiwfe.bus.base import ConsumerOptions
from aiwfe.bus.codec import H_JOB_ID
from aiwfe.bus.errors import NotAccepted
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import admin
from aiwfe.kernel.errors import BadMessage
from aiwfe.kernel.jobs import JobCall, Jobs
from aiwfe.kernel.plugin import HandlerOptions
from aiwfe.kernel.tools.embedded import EmbeddedNats
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


async def _with_leftovers(bus: NatsBus, n: int) -> list[int]:
    """Make the bus's pull subscriptions start with ``n`` deliveries already queued in nats-py
    (what a pull request that outlived its fetch leaves there); returns the counts found."""
    bind = bus.js.pull_subscribe_bind
    left: list[int] = []

    async def bind_with_leftovers(*args: Any, **kwargs: Any) -> Any:
        psub = await bind(*args, **kwargs)
        await bus._conn().publish(psub._nms, b'{"batch": %d, "no_wait": true}' % n, reply=psub._deliver)
        async with asyncio.timeout(5):
            while psub._sub._pending_queue.qsize() < n:
                await asyncio.sleep(0.01)
        left.append(psub._sub._pending_queue.qsize())
        return psub

    bus.js.pull_subscribe_bind = bind_with_leftovers
    return left


async def test_held_deliveries_stay_in_progress_when_slots_free_often(nats_url: str, prefix: str) -> None:
    """Deliveries held past the free slots were told in progress only when a wait for a slot
    lasted a whole heartbeat period (ack wait / 3). With jobs shorter than that, no wait ever
    did: eight held deliveries of 0.25 s jobs at concurrency 1 waited up to 2 s against an ack
    wait of 1 s, the server handed the later ones to the other replica, and they ran twice
    (attempt 2 there, while the first replica still ran them as attempt 1)."""
    one, two = NatsBus(nats_url, prefix, name="one"), NatsBus(nats_url, prefix, name="two")
    await one.start()
    await two.start()
    left = await _with_leftovers(one, 8)
    runs: list[tuple[bytes, int, str]] = []

    def handler(who: str) -> Any:
        async def run(d: Any) -> None:
            await asyncio.sleep(0.25)
            runs.append((d.data, d.attempt, who))
            await d.ack()

        return run

    try:
        await one.accept_kinds(["held"])
        for i in range(8):
            assert await one.enqueue("held", b"%d" % i, {}, f"{prefix}-{i}")
        await one.consume("held", ConsumerOptions(concurrency=1, ack_wait_s=1.0), handler("one"))
        async with asyncio.timeout(5):
            while not left:
                await asyncio.sleep(0.01)
        await two.consume("held", ConsumerOptions(concurrency=8, ack_wait_s=1.0), handler("two"))
        async with asyncio.timeout(15):
            while len({r[0] for r in runs}) < 8:
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # time for a redelivery to show
        assert left == [8]
        assert sorted(runs) == sorted((b"%d" % i, 1, "one") for i in range(8))
    finally:
        await two.close()
        await one.close()


async def test_a_job_fetched_while_the_pod_stops_is_run_not_given_back(nats_url: str, prefix: str) -> None:
    """A stopping pod lets an open fetch finish (its pull request would otherwise swallow
    what is handed back); what that fetch brought was nak'ed at once. A nak counts a delivery:
    the job came back as attempt 2 though it never ran (a handler with ``max_deliver=1`` is
    then dead-lettered as WorkerLost unrun). Now it runs in the draining pod, within its free
    slots, once and as attempt 1."""
    one, two = NatsBus(nats_url, prefix, name="one"), NatsBus(nats_url, prefix, name="two")
    await one.start()
    await two.start()
    runs: list[tuple[bytes, int, str]] = []

    def handler(who: str) -> Any:
        async def run(d: Any) -> None:
            runs.append((d.data, d.attempt, who))
            await d.ack()

        return run

    try:
        await one.accept_kinds(["stopping"])
        await one.consume("stopping", ConsumerOptions(concurrency=4, ack_wait_s=30.0), handler("one"))
        async with asyncio.timeout(5):
            while not one._fetching:  # the loop waits on an open pull request
                await asyncio.sleep(0.01)
        stopping = asyncio.get_running_loop().create_task(one.stop_taking_work())
        await asyncio.sleep(0.05)
        assert await two.enqueue("stopping", b"job", {}, f"{prefix}-job")  # delivered to that open request
        await stopping
        assert await one.wait_idle(5.0)
        await two.consume("stopping", ConsumerOptions(concurrency=4, ack_wait_s=30.0), handler("two"))
        async with asyncio.timeout(10):
            while not runs:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # time for a second run to show
        assert [(data, attempt) for data, attempt, _ in runs] == [(b"job", 1)]
    finally:
        await two.close()
        await one.close()


async def test_a_follower_resumes_after_the_server_restarts(tmp_path: Path) -> None:
    """An ordered consumer lives in the server's memory: a restart loses it. The follower picks
    up where it was, without a gap or a repeat. Before, only once nats-py noticed (two idle
    heartbeats missed): 19.5 s after the appends in 3 of 3 runs. Now the bus re-creates every
    follower's consumer when it reconnects."""
    server = EmbeddedNats(tmp_path / "nats").start()
    bus = NatsBus(server.url, "fr", connect_timeout_s=5)
    await bus.start()
    got: list[tuple[int, bytes]] = []

    async def follow() -> None:
        async for m in bus.follow("fr.events.j"):
            got.append((m.seq, m.data))

    follower = asyncio.get_running_loop().create_task(follow())
    try:
        for i in range(3):
            await bus.append("fr.events.j", b"%d" % i, {})
        async with asyncio.timeout(5):
            while len(got) < 3:
                await asyncio.sleep(0.01)
        await asyncio.to_thread(server.kill)
        server = EmbeddedNats(tmp_path / "nats", port=server.port).start()
        async with asyncio.timeout(15):
            while bus.ready() is not None:
                await asyncio.sleep(0.05)
        for i in range(3, 6):
            for _ in range(50):  # JetStream may need a moment after the restart
                try:
                    await bus.append("fr.events.j", b"%d" % i, {})
                    break
                except NotAccepted:
                    await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with asyncio.timeout(40):
            while len(got) < 6:
                await asyncio.sleep(0.05)
        resumed_s = loop.time() - t0
        print(f"\nfollower resumed {resumed_s:.1f} s after the appends")
        assert resumed_s < 5
        await asyncio.sleep(1)
        assert got == [(i + 1, b"%d" % i) for i in range(6)]
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await bus.close()
        server.kill()


async def test_a_follower_goes_on_after_its_connection_drops(nats_url: str, prefix: str) -> None:
    """A dropped connection to a server that stays up: the bus re-creates the follower's ordered
    consumer on reconnect while the old one still exists on the server (dropped once idle).
    Events appended before, during and after the drop arrive once each, in order."""
    bus = NatsBus(nats_url, prefix, name="blip")
    await bus.start()
    writer = NatsBus(nats_url, prefix, name="blip-writer", manage_streams=False)
    await writer.start()
    subject = f"{prefix}.events.blip"
    got: list[bytes] = []

    async def follow() -> None:
        async for m in bus.follow(subject):
            got.append(m.data)

    follower = asyncio.get_running_loop().create_task(follow())
    try:
        for i in range(3):
            await writer.append(subject, b"%d" % i, {})
        assert await wait_until(lambda: len(got) == 3, timeout_s=5)
        nc: Any = bus.nc
        nc._transport._io_writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)  # the read loop sees EOF
        for i in range(3, 9):
            await writer.append(subject, b"%d" % i, {})
            await asyncio.sleep(0.05)
        assert await wait_until(lambda: len(got) >= 9, timeout_s=8), got
        await asyncio.sleep(1)
        assert got == [b"%d" % i for i in range(9)]
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await writer.close()
        await bus.close()


async def test_a_replayed_job_that_fails_again_is_dead_lettered_again(nats_url: str, prefix: str) -> None:
    """A dead letter's message id was ``dlq-<job id>``: a replayed job that failed again within
    the DLQ stream's two-minute duplicate window was dropped as a duplicate of the dead letter
    the replay had just deleted. The job was recorded failed but was in no dead-letter list,
    so it could not be found or replayed again. The id now names the queued message too (a
    replay is a new one; a redelivery of the same one still dedupes)."""
    bus = NatsBus(nats_url, prefix)
    await bus.start()
    jobs = Jobs(bus)

    async def refuse(call: JobCall) -> bytes:
        raise BadMessage("never valid")

    try:
        await bus.accept_kinds(["dl"])
        await jobs.consume("dl", HandlerOptions(concurrency=2, max_deliver=1), refuse)
        assert await jobs.submit("dl", b"x", {H_JOB_ID: "j1"}, "j1")

        async def failed() -> bool:
            rec = await jobs.record("j1")
            return rec is not None and rec.status == "failed"

        assert await wait_until(failed)
        assert [h[H_JOB_ID] for _, h in await admin.dead_letters(jobs, "dl")] == ["j1"]
        assert await admin.replay_dead_letters(jobs, "dl") == ["j1"]
        assert await wait_until(failed)
        assert await wait_until(lambda: _dead_letters(jobs), timeout_s=3), "the second dead letter was dropped"
        assert await _dead_letters(jobs) == 1
    finally:
        jobs.stop()
        await bus.close()


async def _dead_letters(jobs: Jobs) -> int:
    return len(await admin.dead_letters(jobs, "dl"))
