"""Kill the process of the pod running helios mid-job: the job completes after restart,
its result written once (kernel record, run row, job.done event)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psycopg
import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.routing import Kernel
from aiwfe.plugins.helios.contract import Ask
from tests.support.pods import run_pods, start_pod, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.usefixtures("cleanup_streams")]

MANIFEST = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 1
[pods.brain]
plugins = ["perception", "reasoning"]
[pods.helios]
plugins = ["helios"]
[pods.helios.handlers."helios.ask"]
ack_wait_s = 2
[plugins.helios]
cache_prefix = "{prefix}:"
"""


@pytest.mark.timeout(120)
async def test_kill_helios_pod_mid_job(tmp_path: Path, nats_url: str, prefix: str, pg_url: str, redis_url: str) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_text(MANIFEST.format(prefix=prefix))
    env = {"NATS_URL": nats_url, "DATABASE_URL": pg_url, "REDIS_URL": redis_url}
    cm = run_pods(manifest, ["brain", "helios"], env, tmp_path)
    pods = await asyncio.to_thread(cm.__enter__)
    bus = NatsBus(nats_url, prefix, name="client")
    await bus.start()
    try:
        k = Kernel(bus)
        job_id = await k.submit(Ask(text="How should the database index be designed for security?", max_experts=3, latency_s=3.0))
        events = k.job_events(job_id)
        while (await anext(events)).type != "helios.expert_started":
            pass
        pods["helios"].proc.send_signal(signal.SIGKILL)  # mid-job, experts in flight
        pods["helios"].proc.wait()
        killed_at = time.monotonic()
        pods["helios"] = start_pod(manifest, "helios", env, tmp_path)
        await asyncio.to_thread(wait_ready, [pods["helios"]])
        rec = await k.wait_job(job_id, timeout_s=60)
        recovered_s = time.monotonic() - killed_at
        assert rec.status == "done" and rec.attempts == 2
        types = []
        async for ev in k.job_events(job_id):
            types.append(ev.type)
        assert types.count("job.done") == 1
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            runs = await (await conn.execute("SELECT count(*) FROM helios_runs WHERE job_id = %s", (job_id,))).fetchone()
        assert runs == (1,)
        print(f"\nhelios pod killed mid-job: lost 0, result written once, done {recovered_s:.1f} s after the kill")
    finally:
        await bus.close()
        await asyncio.to_thread(cm.__exit__, None, None, None)
