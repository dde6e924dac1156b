"""Re-composition without loss (issue 13 item 6): the README's procedure, executed.

OLD is the consolidated manifest; NEW moves ``reasoning`` out of ``cognitive-processing-engine``
into a pod of its own (``cognitive-core`` runs the rest). :func:`aiwfe.kernel.tools.recompose.plan`
(what ``aiwfe recompose OLD NEW`` prints) says what to do, and the test does exactly that while
helios jobs and direct calls run: the NATS server knows both manifests' users; every pod NEW
starts is started and answers ``/ready``; then the old instances are sent SIGTERM and drain.

Asserted: 0 jobs lost or failed, each recorded once; 0 calls failed, except retryable ones that
succeeded when the caller retried; no NATS permission violation. Reported as one JSON line.

The memory plugin keeps its vectors in each process (``vector_store = "memory"``): the embedded
store (qdrant-edge) serves one process at a time, so moving ``memory`` needs a Qdrant server
(``QDRANT_URL``), as production has; the README says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.errors import AiwfeError
from aiwfe.kernel.manifest import load_manifest
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools import recompose
from aiwfe.kernel.tools.embedded import free_port
from aiwfe.kernel.tools.natsauth import ADMIN
from aiwfe.plugins.helios.contract import Ask
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.reasoning.contract import Reason
from aiwfe.testing.pods import dump_toml, run_pods, start_pod, wait_ready
from aiwfe.testing.servers import secured_nats
from tests.fault._outcomes import follow_outcomes

pytestmark = [pytest.mark.integration, pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[2]
JOBS_PER_S = 8
CALLERS = 8
MOVE_AT_S, AFTER_S = 3.0, 3.0
#: Bounds, not timing claims.
RETRIES, DEADLINE_S = 5, 120.0


def _manifests(prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    old = tomllib.loads((ROOT / "manifests" / "consolidated.toml").read_text())
    old["system"]["subject_prefix"] = prefix
    old["plugins"]["reasoning"]["latency_s"] = 0.5  # expert calls in flight while the old pod drains
    old["plugins"]["memory"]["vector_store"] = "memory"
    pods = old["pods"]
    cpe = pods["cognitive-processing-engine"]
    new = {
        **old,
        "pods": {
            "unified-api-gateway": pods["unified-api-gateway"],
            "cognitive-core": {**cpe, "plugins": [p for p in cpe["plugins"] if p != "reasoning"]},
            "reasoning-engine": {"plugins": ["reasoning"]},
            "background-worker-engine": pods["background-worker-engine"],
        },
    }
    return old, new


class Calls:
    """Direct calls while the pods move: retryable failures are retried (as a caller should)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.ok = self.retried_ok = 0
        self.failed: list[str] = []

    async def loop(self, i: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            req: Any = (
                Reason(role="generalist", task=f"case {i}.{n}", context=["Plan it."]) if n % 2 else Perceive(text=f"db {n}")
            )
            for attempt in range(RETRIES + 1):
                try:
                    await self.kernel.call(req, timeout_s=10)
                except AiwfeError as e:
                    if e.retryable and attempt < RETRIES:
                        await asyncio.sleep(0.2)
                        continue
                    self.failed.append(f"{type(e).__name__}: {e}")
                    break
                self.ok += 1
                self.retried_ok += attempt > 0
                break


@pytest.mark.timeout(300)
async def test_move_reasoning_to_its_own_pod_under_traffic(
    tmp_path: Path, prefix: str, pg_url: str, redis_url: str, record_property: Any
) -> None:
    old_data, new_data = _manifests(prefix)
    old_path, new_path = tmp_path / "old.toml", tmp_path / "new.toml"
    old_path.write_text(dump_toml(old_data))
    new_path.write_text(dump_toml(new_data))
    env = {
        "AIWFE_PREFIX": prefix,
        "AIWFE_DATA_DIR": str(tmp_path / "data"),
        "AIWFE_GATEWAY_PORT": str(free_port()),
        "AIWFE_EMBEDDER": "hashing",
        "JWT_SECRET": secrets.token_urlsafe(48),
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
    }
    old = load_manifest(old_path, env={**os.environ, **env})
    new = load_manifest(new_path, env={**os.environ, **env})
    plan = recompose.plan(old, new)
    assert plan == recompose.Plan(
        keep=["unified-api-gateway", "background-worker-engine"],
        start=["cognitive-core", "reasoning-engine"],
        drain=["cognitive-processing-engine"],
    )

    with secured_nats(old, tmp_path, new) as nats:  # step 1: both manifests' users
        cm = run_pods(old_path, list(old.pods), env, tmp_path, 60, pod_env=nats.pod_env)
        pods = await asyncio.to_thread(cm.__enter__)
        bus = NatsBus(nats.url(ADMIN), prefix, name="client")
        try:
            await bus.start()
            kernel = Kernel(bus, call_timeout_s=30)
            async with follow_outcomes(nats.url(ADMIN), prefix) as outcomes:
                calls, stop = Calls(kernel), asyncio.Event()
                callers = [asyncio.create_task(calls.loop(i, stop)) for i in range(CALLERS)]
                ids: list[str] = []

                async def submit() -> None:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        ids.append(await kernel.submit(Ask(text=f"How do we shard the database, case {n}?", max_experts=2)))
                        await asyncio.sleep(1 / JOBS_PER_S)

                submitter = asyncio.create_task(submit())
                await asyncio.sleep(MOVE_AT_S)
                t0 = time.monotonic()
                for name in plan.start:  # step 2: start NEW's new and changed pods, wait until ready
                    pods[f"new:{name}"] = start_pod(new_path, name, {**env, **nats.pod_env(name)}, tmp_path)
                await asyncio.to_thread(wait_ready, [pods[f"new:{n}"] for n in plan.start], 60)
                started_s = time.monotonic() - t0
                t1 = time.monotonic()
                for name in plan.drain:  # step 3: drain the old instances
                    pods[name].proc.send_signal(signal.SIGTERM)
                codes = [await asyncio.to_thread(pods[n].proc.wait, old.system.drain_timeout_s + 20) for n in plan.drain]
                drained_s = time.monotonic() - t1
                await asyncio.sleep(AFTER_S)
                stop.set()
                await asyncio.gather(submitter, *callers)
                pending = await outcomes.wait_all(ids, DEADLINE_S)
                records = await asyncio.gather(*(kernel.job_record(j) for j in ids))
                twice = [j for j in ids if len(outcomes.terminal(j)) > 1]
        finally:
            with contextlib.suppress(Exception):
                await bus.close()
            await asyncio.to_thread(cm.__exit__, None, None, None)
        violations = nats.violations()
    failed = [r for r in records if r is not None and r.status != "done"]
    lost = [j for j, r in zip(ids, records, strict=True) if r is None]
    fig = {
        "fault": "recompose",
        "moved": "reasoning: cognitive-processing-engine -> reasoning-engine",
        "jobs": len(ids),
        "jobs_failed": len(failed),
        "jobs_lost": len(lost),
        "recorded_twice": len(twice),
        "jobs_retried": sum(1 for r in records if r is not None and r.attempts > 1),
        "calls": calls.ok + len(calls.failed),
        "calls_failed": len(calls.failed),
        "calls_retried_then_ok": calls.retried_ok,
        "new_pods_ready_s": round(started_s, 2),
        "old_pods_drained_s": round(drained_s, 2),
        "drain_exit_codes": codes,
    }
    print(json.dumps(fig), flush=True)
    record_property("recompose", json.dumps(fig))
    assert not failed and not lost and not pending and not twice, (fig, sorted({str(r.error)[:200] for r in failed})[:3])
    assert not calls.failed, sorted(set(calls.failed))[:5]
    assert codes == [0] * len(plan.drain)
    assert not violations, "NATS permission violations:\n" + "\n".join(violations[:5])
