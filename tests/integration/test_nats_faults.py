"""Fault tests on a NATS server of the test's own (never the system's), with authorization on:
each pod connects as its own least-privilege user, the test's own reads as ``admin``
(:mod:`aiwfe.kernel.tools.natsauth`, the users ``aiwfe up`` gives its server)."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import msgspec
import nats
import pytest

from aiwfe.bus.codec import stream_names
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.jobs import JobRecord
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.embedded import EmbeddedNats
from aiwfe.kernel.tools.natsauth import ADMIN, pod_user
from aiwfe.kernel.tools.up import Auth
from tests.conftest import wait_until
from tests.support.probe import Tally
from tests.unit.test_routing import _get

pytestmark = [pytest.mark.integration, pytest.mark.fault]

MANIFEST = """
[system]
subject_prefix = "fault"
drain_timeout_s = 1
[pods.worker]
plugins = ["tests.support.probe:TallyPlugin"]
[pods.brain]
plugins = ["reasoning"]
"""
JOBS = 1000


def _secured(tmp_path: Path, manifest: str = MANIFEST) -> tuple[EmbeddedNats, Auth]:
    """A server with the manifest's users (not started) and their credentials."""
    auth = Auth.create(parse_manifest(manifest, env={}), tmp_path)
    return EmbeddedNats(tmp_path / "nats", config=auth.config), auth


@pytest.mark.timeout(240)
async def test_kill_nats_with_1000_jobs_in_flight(tmp_path: Path) -> None:
    server, auth = _secured(tmp_path)
    server.start()
    m = parse_manifest(MANIFEST, env={})
    worker = PodRunner(m, "worker", NatsBus(auth.url(server.url, pod_user("worker")), "fault", name="worker"), ops_port=0)
    brain = PodRunner(m, "brain", NatsBus(auth.url(server.url, pod_user("brain")), "fault", name="brain"), ops_port=0)
    await brain.start()
    await worker.start()
    try:
        base = _done_count()  # the counter is process-wide: other tests may have run tally jobs
        ids = [await worker.kernel.submit(Tally(n=i, delay_s=0.4)) for i in range(JOBS)]
        # Let some finish, then kill -9 the server mid-stream.
        assert await wait_until(lambda: _done_count() - base >= 150, timeout_s=60)
        done_before = _done_count() - base
        await asyncio.to_thread(server.kill)
        killed_at = time.monotonic()
        assert await wait_until(lambda: not worker.ready, timeout_s=15)  # /ready says not ready
        await asyncio.sleep(2.0)  # the outage itself, not a wait for a condition
        server = EmbeddedNats(tmp_path / "nats", port=server.port, config=auth.config).start()
        restarted_at = time.monotonic()
        assert await wait_until(lambda: worker.ready and brain.ready, timeout_s=20)
        assert await wait_until(lambda: _all_recorded(worker, ids), timeout_s=150, every_s=0.5)
        recovered_s = time.monotonic() - restarted_at

        # Every job has exactly one record and exactly one job.done event.
        nc = await nats.connect(auth.url(server.url, ADMIN), inbox_prefix=f"_INBOX.{ADMIN}")
        js = nc.jetstream()
        kv = await js.key_value(stream_names("fault")["results"])
        records = [msgspec.msgpack.decode((await kv.get(j)).value, type=JobRecord) for j in ids]
        assert all(r.status == "done" for r in records)
        assert sorted(msgspec.msgpack.decode(r.result)["square"] for r in records) == sorted(i * i for i in range(JOBS))
        done_events = collections.Counter()
        sub = await js.subscribe("fault.events.>", ordered_consumer=True)
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            if (msg.headers or {}).get("Aiwfe-Type") == "job.done":
                done_events[msg.subject.rsplit(".", 1)[1]] += 1
        await nc.close()
        assert len(done_events) == JOBS and set(done_events.values()) == {1}
        jobs_info = await _stream_msgs(auth.url(server.url, ADMIN), stream_names("fault")["jobs"])
        assert jobs_info == 0  # the work queue is empty: everything acked
        print(
            f"\nkill-nats: {JOBS} jobs, {done_before} done before the kill, lost 0, "
            f"duplicates 0, outage {restarted_at - killed_at:.1f} s, all done {recovered_s:.1f} s after restart"
        )
    finally:
        await worker.stop()
        await brain.stop()
        server.stop()


async def _all_recorded(pod: PodRunner, ids: list[str]) -> bool:
    """True when every job has its outcome record (False while NATS is away)."""
    try:
        recs = await asyncio.gather(*(pod.kernel.job_record(j) for j in ids))
    except Exception:
        return False
    return all(r is not None for r in recs)


def _done_count() -> int:
    from aiwfe.kernel import metrics

    return int(metrics.JOBS.labels("probe.tally", "done")._value.get())


async def _stream_msgs(url: str, stream: str) -> int:
    nc = await nats.connect(url, inbox_prefix=f"_INBOX.{ADMIN}")
    info = await nc.jetstream().stream_info(stream)
    await nc.close()
    return int(info.state.messages)


@pytest.mark.timeout(180)
async def test_three_node_cluster_loses_a_node_mid_stream(tmp_path: Path) -> None:
    from aiwfe.kernel.tools.embedded import embedded_cluster

    manifest = MANIFEST.replace('subject_prefix = "fault"', 'subject_prefix = "fault"\nstream_replicas = 3')
    m = parse_manifest(manifest, env={})
    auth = Auth.create(m, tmp_path)
    nodes = embedded_cluster(tmp_path / "cluster", config=auth.config)
    for n in nodes:
        n.start()
    urls = ",".join(n.url for n in nodes)
    worker = brain = None
    try:
        # JetStream needs a meta leader before streams can be created: retry until the cluster formed.
        for _ in range(60):
            try:
                bus = NatsBus(auth.url(urls, pod_user("brain")), "fault", name="brain", replicas=3)
                brain = PodRunner(m, "brain", bus, ops_port=0)
                await brain.start()
                break
            except Exception:
                brain = None
                await asyncio.sleep(0.5)
        assert brain is not None, "the cluster never formed"
        bus = NatsBus(auth.url(urls, pod_user("worker")), "fault", name="worker", replicas=3)
        worker = PodRunner(m, "worker", bus, ops_port=0)
        await worker.start()
        before = _done_count()
        ids = [await worker.kernel.submit(Tally(n=i, delay_s=0.2)) for i in range(300)]
        assert await wait_until(lambda: _done_count() - before >= 50, timeout_s=60)
        # kill the node the worker is connected to, so its client must fail over
        connected = worker.bus.nc.connected_url.port  # type: ignore[union-attr]
        victim = next(n for n in nodes if n.port == connected)
        await asyncio.to_thread(victim.kill)
        killed_at = time.monotonic()
        assert await wait_until(lambda: _all_recorded(worker, ids), timeout_s=120, every_s=0.5)
        recovered_s = time.monotonic() - killed_at
        recs = await asyncio.gather(*(worker.kernel.wait_job(j, timeout_s=30) for j in ids))
        assert all(r.status == "done" for r in recs)
        assert sorted(msgspec.msgpack.decode(r.result)["n"] for r in recs) == list(range(300))
        assert worker.bus.nc.connected_url.port != connected  # type: ignore[union-attr]
        print(f"\nnats cluster: node killed mid-stream, 300 jobs, lost 0, failover and finish {recovered_s:.1f} s")
    finally:
        if worker is not None:
            await worker.stop()
        if brain is not None:
            await brain.stop()
        for n in nodes:
            n.stop()


@pytest.mark.timeout(180)
@pytest.mark.slow
async def test_nats_gone_for_60_s(tmp_path: Path) -> None:
    server, auth = _secured(tmp_path)
    server.start()
    m = parse_manifest(MANIFEST, env={})
    worker = PodRunner(m, "worker", NatsBus(auth.url(server.url, pod_user("worker")), "fault", name="worker"), ops_port=0)
    brain = PodRunner(m, "brain", NatsBus(auth.url(server.url, pod_user("brain")), "fault", name="brain"), ops_port=0)
    await brain.start()
    await worker.start()
    try:
        assert (await worker.kernel.wait_job(await worker.kernel.submit(Tally(n=1, delay_s=0)), timeout_s=20)).status == "done"
        await asyncio.to_thread(server.kill)
        assert await wait_until(lambda: not worker.ready and not brain.ready, timeout_s=15)
        status, body = await _get(worker.ops.port, "/ready")
        assert status == 503 and b"NATS" in body
        await asyncio.sleep(60)
        status, _ = await _get(worker.ops.port, "/health")
        assert status == 200  # the pods stayed up all along
        server = EmbeddedNats(tmp_path / "nats", port=server.port, config=auth.config).start()
        back_at = time.monotonic()

        async def flows() -> bool:
            try:
                rec = await worker.kernel.wait_job(await worker.kernel.submit(Tally(n=2, delay_s=0)), timeout_s=2)
                return rec.status == "done"
            except Exception:
                return False

        assert await wait_until(flows, timeout_s=10, every_s=0.1)
        print(f"\nnats gone 60 s: pods stayed up, traffic again {time.monotonic() - back_at:.1f} s after its return")
    finally:
        await worker.stop()
        await brain.stop()
        server.stop()
