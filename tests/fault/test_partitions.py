"""Partitions (issue 13 item 5): a three-node NATS cluster, each node in a network namespace of
its own (:mod:`tests.support.cluster`), streams and the results bucket with three replicas.

A worker pod (the probe's ``tally`` jobs, which call ``reasoning`` in a second pod) and the test's
submitter run in the root namespace, connected to all three nodes. A steady stream of jobs is
submitted; mid-stream one node is cut off (not the worker's: the jobs stream's leader when it can
be, and not the submitter's), then the node the worker is connected to (now only one node is reachable: JetStream has no
quorum and refuses new jobs); then both heal. Every job whose submission JetStream acknowledged
must complete exactly once (its record ``done``, one ``job.done`` event). Submissions refused or
unanswered during the outage are not acknowledged jobs: they are counted, not required.

Reported as one JSON line (and the test's ``partition`` property): jobs acknowledged, refused,
lost (0), recorded twice (0), and seconds from the heal to the first and to the last completion.
Skips, with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from aiwfe.bus.codec import H_TYPE, stream_names
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.jobs import EV_DONE
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools.natsauth import ADMIN, inbox_prefix, pod_user
from aiwfe.kernel.tools.up import Auth
from tests.fault._outcomes import TERMINAL
from tests.support.cluster import NetnsCluster, netns_cluster, netns_unavailable_reason
from tests.support.probe import Tally

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PREFIX = "part"
MANIFEST = f"""
[system]
subject_prefix = "{PREFIX}"
drain_timeout_s = 1
stream_replicas = 3
[pods.worker]
plugins = ["tests.support.probe:TallyPlugin"]
[pods.brain]
plugins = ["reasoning"]
"""
RATE_PER_S = 20
#: The script, in seconds from the first submission.
CUT_FIRST_AT_S, CUT_WORKER_NODE_AT_S, HEAL_AT_S, STOP_AT_S = 4.0, 14.0, 20.0, 30.0
#: Bounds, not timing claims.
SUBMIT_TIMEOUT_S, FINISH_DEADLINE_S = 5.0, 150.0


class Pending:
    """The acknowledged jobs, and when each was first seen with its record."""

    def __init__(self) -> None:
        self.acked: dict[str, int] = {}
        self.refused: collections.Counter[str] = collections.Counter()
        self.done_at: dict[str, float] = {}
        self.acked_in: collections.Counter[str] = collections.Counter()
        self.acked_at: list[tuple[str, float]] = []

    async def submit(self, kernel: Kernel, n: int, phase: str) -> None:
        try:
            job_id = await asyncio.wait_for(kernel.submit(Tally(n=n, delay_s=0.1)), SUBMIT_TIMEOUT_S)
        except Exception as e:  # not acknowledged: refused (no quorum) or unanswered (cut off)
            self.refused[type(e).__name__] += 1
            return
        self.acked[job_id] = n
        self.acked_in[phase] += 1
        self.acked_at.append((phase, time.monotonic()))

    async def poll(self, kernel: Kernel, stop: asyncio.Event) -> None:
        """Note when each acknowledged job's record appears (lookups fail while NATS is cut off)."""
        while not stop.is_set():
            pending = [j for j in self.acked if j not in self.done_at]
            if pending:
                recs = await asyncio.gather(
                    *(asyncio.wait_for(kernel.job_record(j), 2.0) for j in pending), return_exceptions=True
                )
                now = time.monotonic()
                for j, r in zip(pending, recs, strict=True):
                    if r is not None and not isinstance(r, BaseException):
                        self.done_at[j] = now
            await asyncio.sleep(0.25)


async def _start(make: Callable[[], PodRunner], timeout_s: float = 60.0) -> PodRunner:
    """Start the pod ``make`` gives once the cluster has formed (JetStream has a meta leader)."""
    end = time.monotonic() + timeout_s
    while True:
        pod = make()
        try:
            await pod.start()
            return pod
        except Exception:
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.5)


def _node_of(cluster: NetnsCluster, bus: Any) -> int:
    """The node ``bus`` (a NatsBus) is connected to now."""
    return cluster.node_at(str(bus.nc.connected_url.hostname))


async def _terminal_events(url: str) -> dict[str, list[str]]:
    """Every job's terminal event types, replayed from the events stream."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    nc = await nats.connect(url.split(","), inbox_prefix=inbox_prefix(ADMIN).encode())
    try:
        sub = await nc.jetstream().subscribe(f"{PREFIX}.events.>", ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=3)
            except nats.errors.TimeoutError:
                break
            typ = (msg.headers or {}).get(H_TYPE, "")
            if typ in TERMINAL:
                out[msg.subject.rsplit(".", 1)[1]].append(typ)
    finally:
        await nc.close()
    return out


@pytest.mark.timeout(360)
async def test_cut_a_node_then_the_workers_node_mid_stream(tmp_path: Path, record_property: Any) -> None:
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"partition test needs network namespaces: {reason}")
    m = parse_manifest(MANIFEST, env={})
    auth = Auth.create(m, tmp_path)
    with netns_cluster(tmp_path / "cluster", config=auth.config) as cluster:

        def bus(user: str, name: str) -> NatsBus:
            return NatsBus(auth.url(cluster.urls, user), PREFIX, name=name, replicas=3)

        def pod(name: str) -> Callable[[], PodRunner]:
            return lambda: PodRunner(m, name, bus(pod_user(name), name), ops_port=0)

        client = bus(ADMIN, "submitter")
        stack = contextlib.AsyncExitStack()
        try:
            brain = await _start(pod("brain"))
            stack.push_async_callback(brain.stop)
            worker = await _start(pod("worker"))
            stack.push_async_callback(worker.stop)
            await client.start()
            stack.push_async_callback(client.close)
            kernel = Kernel(client)
            jobs = Pending()
            stop_polling = asyncio.Event()
            poller = asyncio.create_task(jobs.poll(kernel, stop_polling))
            submissions: list[asyncio.Task[None]] = []
            t0 = time.monotonic()
            script = [(CUT_FIRST_AT_S, "cut first"), (CUT_WORKER_NODE_AT_S, "cut worker's"), (HEAL_AT_S, "heal")]
            cut: list[int] = []
            marks: dict[str, float] = {}
            phase = "all up"
            n = 0
            while (now := time.monotonic() - t0) < STOP_AT_S:
                if script and now >= script[0][0]:
                    _, step = script.pop(0)
                    worker_node = _node_of(cluster, worker.bus)
                    if step == "cut first":
                        info = await client.js.stream_info(stream_names(PREFIX)["jobs"])
                        leader = cluster.nodes.index(next(x for x in cluster.nodes if x.name == info.cluster.leader))
                        # not the worker's node (that one is next), nor the submitter's: the one cut first
                        # measures the cluster, not how soon a client notices a stalled connection
                        busy = {worker_node, _node_of(cluster, client)}
                        spare = [i for i in range(len(cluster.nodes)) if i not in busy]
                        victim = leader if leader in spare else spare[0]
                    elif step == "cut worker's":
                        victim = worker_node
                    else:
                        victim = -1
                    if victim >= 0:
                        cluster.cut(victim)
                        cut.append(victim)
                    else:
                        for i in cut:
                            cluster.heal(i)
                    marks[step] = time.monotonic()
                    phase = {"cut first": "one cut off", "cut worker's": "two cut off", "heal": "healed"}[step]
                n += 1
                submissions.append(asyncio.create_task(jobs.submit(kernel, n, phase)))
                await asyncio.sleep(1 / RATE_PER_S)
            await asyncio.gather(*submissions)
            healed_at = marks["heal"]
            end = time.monotonic() + FINISH_DEADLINE_S
            while len(jobs.done_at) < len(jobs.acked) and time.monotonic() < end:
                await asyncio.sleep(0.5)
            stop_polling.set()
            await poller

            records = await asyncio.gather(*(kernel.job_record(j) for j in jobs.acked))
            lost = [j for j, r in zip(jobs.acked, records, strict=True) if r is None]
            failed = [r for r in records if r is not None and r.status != "done"]
            wrong = [
                r
                for r in records
                if r is not None and r.status == "done" and msgspec.msgpack.decode(r.result)["n"] != jobs.acked[r.job_id]
            ]
            terminal = await _terminal_events(auth.url(cluster.urls, ADMIN))
            twice = [j for j in jobs.acked if len(terminal.get(j, [])) > 1]
            no_event = [j for j in jobs.acked if terminal.get(j) != [EV_DONE] and j not in twice]
            after_heal = [t for t in jobs.done_at.values() if t >= healed_at]
            acked_after_heal = [t for _, t in jobs.acked_at if t >= healed_at]
            # submitted after the first cut, acknowledged by the two nodes left
            acked_one_cut = [t for ph, t in jobs.acked_at if ph == "one cut off"]
            fig = {
                "fault": "partition",
                "nodes": 3,
                "cut": [cluster.nodes[i].name for i in cut],
                "submitted": n,
                "acknowledged": len(jobs.acked),
                "acknowledged_by_phase": dict(jobs.acked_in),
                "not_acknowledged": dict(jobs.refused),
                "lost": len(lost),
                "failed": len(failed),
                "recorded_twice": len(twice),
                "retried": sum(1 for r in records if r is not None and r.attempts > 1),
                "first_ack_after_first_cut_s": round(min(acked_one_cut) - marks["cut first"], 2) if acked_one_cut else None,
                "first_ack_after_heal_s": round(min(acked_after_heal) - healed_at, 2) if acked_after_heal else None,
                "first_done_after_heal_s": round(min(after_heal) - healed_at, 2) if after_heal else None,
                "all_done_after_heal_s": round(max(jobs.done_at.values()) - healed_at, 2) if jobs.done_at else None,
            }
            print(json.dumps(fig), flush=True)
            record_property("partition", json.dumps(fig))
            assert jobs.acked_in.get("healed"), f"no job acknowledged after the heal: {fig}"
            assert not lost and not failed and not wrong, fig
            assert not twice and not no_event, f"terminal events: {len(twice)} twice, {len(no_event)} missing or not job.done"
        finally:
            await stack.aclose()
