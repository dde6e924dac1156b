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


GATEWAY = [
    "tests.support.auth_double:AuthDoublePlugin",  # a fake stands in for the auth plugin
    "perception",
    "reasoning",
    "tests.support.probe:ProbePlugin",
    "gateway",
]


@pytest.mark.timeout(180)
@pytest.mark.aiwfe_placements(
    "monolith", "per_plugin", plugins=GATEWAY, config={"gateway": {"job_kinds": {"crunch": "probe.crunch"}}}
)
async def test_the_gateway_helpers(aiwfe_system: System) -> None:
    import json

    from tests.support.auth_double import make_token

    s = aiwfe_system
    auth = {"Authorization": f"Bearer {make_token()}"}
    async with s.http() as c:
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 4}}, headers=auth)
        assert r.status_code == 202, r.text
        rec = await s.kernel.wait_job(r.json()["job_id"])
        assert msgspec.msgpack.decode(rec.result)["square"] == 16
        assert (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 4}})).status_code == 401
    async with s.ws(make_token()) as ws:
        await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": 5}, "id": "c1"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("result", "error"):
            async with asyncio.timeout(30):
                frames.append(json.loads(await ws.recv()))
    assert frames[0]["type"] == "accepted" and frames[-1]["result"]["square"] == 25
    s.record("ws", [f.get("event") for f in frames if f["type"] == "event"])
