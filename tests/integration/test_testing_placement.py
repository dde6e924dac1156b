"""aiwfe.testing's placement runner on the project's probe plugins: one body, every placement.

The probe plugins call the real perception and reasoning plugins, so a split placement makes
remote calls where the monolith makes local ones; the recorded results must still agree.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from aiwfe.kernel import RemoteError
from aiwfe.testing import System
from tests.support.probe import Ask, Boom, Crunch, Tally

pytestmark = [pytest.mark.integration, pytest.mark.placement]

PLUGINS = ["perception", "reasoning", "tests.support.probe:ProbePlugin", "tests.support.probe:TallyPlugin"]


@pytest.mark.timeout(180)
@pytest.mark.aiwfe_placements("monolith", "per_plugin", "random", plugins=PLUGINS)
async def test_one_body_under_every_placement(aiwfe_system: System) -> None:
    s = aiwfe_system
    answer = await s.call(Ask(text="How do I make the Postgres query fast?", context=["An index makes a query fast."]))
    s.record("answer", msgspec.to_builtins(answer))

    job_id = await s.submit(Crunch(n=7, fail_times=1))
    rec = await s.kernel.wait_job(job_id, timeout_s=30)
    assert (rec.status, rec.attempts) == ("done", 2)
    s.record("crunch", msgspec.msgpack.decode(rec.result)["square"])
    s.record("events", [ev.type for ev in await s.events(job_id)])
    s.record("tally", (await s.result(Tally(n=12, delay_s=0)))["square"])

    with pytest.raises(RemoteError) as e:
        await s.call(Boom(message="nope"))
    s.record("error", (e.value.type, e.value.message))


@pytest.mark.timeout(180)
@pytest.mark.aiwfe_placements("per_plugin", "random:2", plugins=PLUGINS)
async def test_a_killed_pod_loses_no_job(aiwfe_system: System) -> None:
    s = aiwfe_system
    pod = s.pod_of("tests.support.probe:TallyPlugin")
    ids = [await s.submit(Tally(n=i, delay_s=0.2)) for i in range(30)]
    await asyncio.sleep(0.3)
    await s.kill(pod)
    await s.restart(pod)
    recs = await asyncio.gather(*(s.kernel.wait_job(j, timeout_s=60) for j in ids))
    assert [msgspec.msgpack.decode(r.result)["square"] for r in recs] == [i * i for i in range(30)]
    assert s.pods[pod].ready()
