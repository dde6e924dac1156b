"""Fault tests on a NATS server of the test's own (never the system's)."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import msgspec
import nats
import pytest

from bus.codec import decode_record, stream_names
from bus.embedded import EmbeddedNats
from bus.nats import NatsBus
from kernel.manifest import parse_manifest
from kernel.pod import PodRunner
from tests.conftest import wait_until
from tests.support.probe import Tally

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


@pytest.mark.timeout(240)
async def test_kill_nats_with_1000_jobs_in_flight(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    m = parse_manifest(MANIFEST, env={})
    worker = PodRunner(m, "worker", NatsBus(server.url, "fault", name="worker"), ops_port=0)
    brain = PodRunner(m, "brain", NatsBus(server.url, "fault", name="brain"), ops_port=0)
    await brain.start()
    await worker.start()
    try:
        ids = [await worker.kernel.submit(Tally(n=i, delay_s=0.4)) for i in range(JOBS)]
        # Let some finish, then kill -9 the server mid-stream.
        assert await wait_until(lambda: _done_count(worker) >= 150, timeout_s=60)
        done_before = _done_count(worker)
        await asyncio.to_thread(server.kill)
        killed_at = time.monotonic()
        assert await wait_until(lambda: not worker.ready, timeout_s=15)  # /ready says not ready
        await asyncio.sleep(2.0)
        server = EmbeddedNats(tmp_path / "nats", port=server.port).start()
        restarted_at = time.monotonic()
        assert await wait_until(lambda: worker.ready and brain.ready, timeout_s=20)
        assert await wait_until(lambda: _done_count(worker) >= JOBS, timeout_s=150), f"done {_done_count(worker)}/{JOBS}"
        recovered_s = time.monotonic() - restarted_at

        # Every job has exactly one record and exactly one job.done event.
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        kv = await js.key_value(stream_names("fault")["results"])
        records = [decode_record((await kv.get(j)).value) for j in ids]
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
        jobs_info = await _stream_msgs(server.url, stream_names("fault")["jobs"])
        assert jobs_info == 0  # the work queue is empty: everything acked
        print(
            f"\nkill-nats: {JOBS} jobs, {done_before} done before the kill, lost 0, "
            f"duplicates 0, outage {restarted_at - killed_at:.1f} s, all done {recovered_s:.1f} s after restart"
        )
    finally:
        await worker.stop()
        await brain.stop()
        server.stop()


def _done_count(pod: PodRunner) -> int:
    from kernel import metrics

    return int(metrics.JOBS.labels("probe.tally", "done")._value.get())


async def _stream_msgs(url: str, stream: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(stream)
    await nc.close()
    return int(info.state.messages)
