"""The echo plugins under every placement, against real servers: all in one pod in-process, one
pod per plugin (each its own process, over NATS, as its own NATS user), and random partitions.
Only aiwfe.testing (its fixtures come with `pip install aiwfe[testing]`) and our own package."""

from __future__ import annotations

import pytest
from aiwfe_echo.contract import Echo, Shout, Shouted

from aiwfe.testing import System

everywhere = pytest.mark.aiwfe_placements(
    "monolith",
    "per_plugin",
    "random",  # one placement per seed of --aiwfe-seeds
    plugins=["echo", "shout"],
    config={"echo": {"key_prefix": "${AIWFE_PREFIX}"}},  # the test's own prefix: counters start at 0
    services=["redis"],  # REDIS_URL: the environment's, a container, or an embedded Valkey
)


@everywhere
async def test_echo(aiwfe_system: System) -> None:
    first = await aiwfe_system.call(Echo(text="hello"))
    second = await aiwfe_system.call(Echo(text="hello"))
    assert (first.text, first.count, second.count) == ("hello", 1, 2)
    aiwfe_system.record("echo", [first, second])  # equal under every placement, or the test fails


@everywhere
async def test_shout_is_a_durable_job(aiwfe_system: System) -> None:
    job_id = await aiwfe_system.submit(Shout(text="hi", times=3))
    events = [e.type for e in await aiwfe_system.events(job_id)]
    rec = await aiwfe_system.kernel.wait_job(job_id)
    assert rec.status == "done"
    assert events == ["echo.shouting"] * 3 + ["job.done"]
    result = await aiwfe_system.result(Shout(text="again"), Shouted)
    assert result.text == "AGAIN"
    aiwfe_system.record("shout", (events, result.text))


@pytest.mark.aiwfe_placements("per_plugin", plugins=["echo", "shout"], services=["redis"])
async def test_shout_survives_a_restarted_echo_pod(aiwfe_system: System) -> None:
    pod = aiwfe_system.pod_of("echo")
    await aiwfe_system.kill(pod)
    job_id = await aiwfe_system.submit(Shout(text="later"))
    await aiwfe_system.restart(pod)
    rec = await aiwfe_system.kernel.wait_job(job_id, timeout_s=60)
    assert rec.status == "done"
