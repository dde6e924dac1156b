"""Fair queueing between owners across pods, over a real NATS server.

A job's owner travels with every call made inside it (the call preamble) and the serving
pod's handler queue takes owners in turn (:class:`aiwfe.kernel.Limiter`); a direct call
carries whom :func:`aiwfe.kernel.acting_for` names (the gateway: its user). A user
with many queued calls to a busy contract delays another user's call by one call, not by
the whole queue. Here the contract serves one call at a time in its own pod; one owner's 8
jobs queue their calls before another owner submits 2.
"""

from __future__ import annotations

import asyncio

import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import Job, Plugin, Reply, Request, acting_for, current_owner, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.pods import dump_toml

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


class Served(Reply):
    owner: str
    n: int


class Slot(Request[Served], tag="fair.slot"):
    n: int


class Work(Job[Served], tag="fair.work"):
    owner: str
    n: int


class BackPlugin(Plugin):
    """One call at a time, in the order the queue hands slots out."""

    name = "fairback"
    served: list[tuple[str, int]] = []

    @serves(Slot, concurrency=1, max_queue=64, timeout_s=60)
    async def slot(self, req: Slot) -> Served:
        owner = current_owner() or "?"
        BackPlugin.served.append((owner, req.n))
        await asyncio.sleep(0.25)  # long beside the ~10 ms a job takes to reach its call, even on a loaded machine
        return Served(owner=owner, n=req.n)


class FrontPlugin(Plugin):
    name = "fairfront"
    calls = (Slot,)

    @serves(Work, concurrency=16, ack_wait_s=30)
    async def work(self, job: Work) -> Served:
        return await self.kernel.call(Slot(n=job.n), timeout_s=60)


async def test_a_second_owner_is_served_in_turn_not_after_the_first_owners_queue(nats_url: str, prefix: str) -> None:
    m = parse_manifest(
        dump_toml(
            {
                "system": {"subject_prefix": prefix, "drain_timeout_s": 1},
                "pods": {
                    "front": {"plugins": ["tests.integration.test_fair_calls:FrontPlugin"]},
                    "back": {"plugins": ["tests.integration.test_fair_calls:BackPlugin"]},
                },
            }
        ),
        env={},
    )
    BackPlugin.served = []
    async with (
        PodRunner(m, "back", NatsBus(nats_url, prefix, name="fair-back"), ops_port=0),
        PodRunner(m, "front", NatsBus(nats_url, prefix, name="fair-front"), ops_port=0) as front,
    ):
        kernel = front.kernel
        first = [await kernel.submit(Work(owner="alice", n=i)) for i in range(8)]
        for _ in range(200):  # alice's calls are queued in the back pod (one runs)
            if BackPlugin.served:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        k = len(BackPlugin.served)  # alice's calls served (or running) before bob's come
        assert k < 5, BackPlugin.served
        later = [await kernel.submit(Work(owner="bob", n=100 + i)) for i in range(2)]
        records = [await kernel.wait_job(j, timeout_s=60) for j in first + later]
        assert [r.status for r in records] == ["done"] * 10
        order = [owner for owner, _ in BackPlugin.served]
        assert sorted(order) == ["alice"] * 8 + ["bob"] * 2
        # FIFO would serve bob's calls 9th and 10th, after all of alice's queued ones; in
        # turn, each comes after at most one more of alice's (one more may end while bob's
        # job reaches its call).
        bob_at = [i for i, owner in enumerate(order) if owner == "bob"]
        assert bob_at[0] <= k + 2 < 8 and bob_at[1] - bob_at[0] <= 2, (k, order)
        # A direct call outside any job acts for whom the caller names (the gateway: its user).
        with acting_for("carol"):
            assert (await kernel.call(Slot(n=7))).owner == "carol"
        assert (await kernel.call(Slot(n=8))).owner == "?"
