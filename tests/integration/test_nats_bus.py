"""The call/job/event semantics of tests/unit/test_routing.py and test_jobs.py, over a real NATS server.

Every pod gets its own NatsBus connection, so calls between pods cross the server.
Also: JSON from external publishers, heartbeats for long jobs, and drain on stop.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.conftest import wait_until
from tests.support.pods import StartPods
from tests.support.probe import Crunch
from tests.unit.test_jobs import *  # noqa: F403  (the same job test bodies, over NATS)
from tests.unit.test_routing import *  # noqa: F403  (the same call test bodies, over NATS)
from tests.unit.test_routing import PROBE, TWO_PODS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


def _publish(nats_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", "publish", "--url", nats_url, "--prefix", prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )


async def test_external_json_publisher_rpc_and_job(start_pods: StartPods, nats_url: str, prefix: str) -> None:
    async with start_pods(TWO_PODS):
        r = await asyncio.to_thread(
            _publish, nats_url, prefix, f"{prefix}.perception.perceive", '{"text": "Deploy it to Kubernetes"}'
        )
        assert r.returncode == 0, r.stderr
        reply = json.loads(r.stdout)
        assert reply["intent"] == "command" and reply["expertise"][0]["tag"] == "devops"

        r = await asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.jobs.probe.crunch", '{"n": 9}', "--wait")
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["status"] == "done" and out["result"]["square"] == 81

        r = await asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.perception.perceive", '{"txt": 1}')
        assert r.returncode == 1
        assert json.loads(r.stdout)["error"]["code"] == "bad_message"


async def test_long_job_heartbeats_prevent_redelivery(start_pods: StartPods) -> None:
    # probe.crunch has ack_wait_s = 3: a 7 s job survives only through in-progress heartbeats.
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=4, delay_s=7.0))
        rec = await k.wait_job(job_id, timeout_s=30)
        assert rec.status == "done" and rec.attempts == 1


async def test_stopping_pod_returns_unfinished_jobs(nats_url: str, prefix: str) -> None:
    text = TWO_PODS.replace("{prefix}", prefix).replace("drain_timeout_s = 2", "drain_timeout_s = 0.5")
    m = parse_manifest(text, env={})
    back = PodRunner(m, "back", NatsBus(nats_url, prefix), ops_port=0)
    first = PodRunner(m, "front", NatsBus(nats_url, prefix), ops_port=0)
    await back.start()
    await first.start()
    ids = [await back.kernel.submit(Crunch(n=i, delay_s=3.0)) for i in range(5)]
    assert await wait_until(lambda: len(first.kernel.jobs._running) == 5)  # all five are running in `first`
    await first.stop()  # drain limit 0.5 s: they are nak'ed, not lost
    second = PodRunner(m, "front", NatsBus(nats_url, prefix), ops_port=0)
    await second.start()
    try:
        recs = await asyncio.gather(*(back.kernel.wait_job(j, timeout_s=30) for j in ids))
        assert all(r.status == "done" for r in recs)
        assert all(r.attempts == 2 for r in recs), [r.attempts for r in recs]
        assert sorted(msgspec.msgpack.decode(r.result)["n"] for r in recs) == list(range(5))
    finally:
        await second.stop()
        await back.stop()


def test_probe_module_importable_by_children() -> None:
    # The placement suite starts pods as child processes that import the probe plugin by path.
    r = subprocess.run(
        [sys.executable, "-c", f"import {PROBE.split(':')[0]}"],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ},
        timeout=60,
    )
    assert r.returncode == 0


def _dlq(nats_url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", "dlq", *args, "--url", nats_url, "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )


async def test_dlq_command_lists_reasons_and_replays(start_pods: StartPods, nats_url: str, prefix: str) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=-2))
        assert (await k.wait_job(job_id, timeout_s=20)).status == "failed"
        r = await asyncio.to_thread(_dlq, nats_url, prefix, "list", "--kind", "probe.crunch")
        assert r.returncode == 0, r.stderr
        letter = json.loads(r.stdout.strip().splitlines()[-1])
        assert letter["job_id"] == job_id and letter["attempts"] == 3 and letter["payload"]["n"] == -2
        assert letter["reason"]["type"] == "ValueError" and "poison" in letter["reason"]["message"]
        pods["front"].plugins[PROBE].reject_negative = False
        r = await asyncio.to_thread(_dlq, nats_url, prefix, "replay", "--job-id", job_id)
        assert json.loads(r.stdout) == {"replayed": [job_id]}
        rec = await k.wait_job(job_id, timeout_s=20)  # replay removed the failed record first
        assert rec.status == "done" and msgspec.msgpack.decode(rec.result)["square"] == 4


async def test_queue_depth_and_oldest_age_are_exported(start_pods: StartPods) -> None:
    from aiwfe.kernel import metrics
    from tests.conftest import wait_until

    async with start_pods(
        TWO_PODS.replace("drain_timeout_s = 2", 'drain_timeout_s = 0.2\n[pods.front.handlers."probe.crunch"]\nconcurrency = 1')
    ) as pods:
        k = pods["back"].kernel
        for i in range(4):
            await k.submit(Crunch(n=i, delay_s=20))

        def gauge(name: str) -> float:
            return float(metrics.REGISTRY.get_sample_value(name, {"kind": "probe.crunch"}) or 0.0)

        assert await wait_until(lambda: gauge("aiwfe_job_queue_depth") == 4, timeout_s=12)
        assert await wait_until(lambda: gauge("aiwfe_job_oldest_age_seconds") > 0, timeout_s=12)
