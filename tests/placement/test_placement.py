"""The placement suite: one end-to-end test body under every shipped manifest and under seeded
random partitions of the plugins (``--aiwfe-seeds``; CI runs several), through aiwfe.testing.

Each placement's pods run as child processes (``aiwfe run``), talking only over NATS, on a
nats-server of the test's own with authorization on: each pod as its own least-privilege
user (:mod:`aiwfe.kernel.tools.natsauth`), and no permission violation may occur; the test
process is an outside client with a kernel and no plugins, as the operator (``admin``). The test-only
probe plugins join the manifest: into the single pod for the monolith, as pods of
their own otherwise. Results must equal what the plugins' pure functions give, so
every placement gives identical results.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aiwfe.kernel import DeadlineExceeded, Overloaded, RemoteError, Unavailable
from aiwfe.kernel.routing import Kernel
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.perception.plugin import PerceptionPlugin
from aiwfe.plugins.reasoning.plugin import extract
from aiwfe.testing import Placement, SystemSpec, start_system
from aiwfe.testing.plugin import seeds
from tests.conftest import wait_until
from tests.support.gateway import register_and_login
from tests.support.probe import Ask, Boom, Crunch, Sleep, Tally
from tests.unit.test_routing import Unserved

pytestmark = [pytest.mark.integration, pytest.mark.placement]

PLACEMENTS = ["monolith", "consolidated", "microservices"]
TEST_PLUGINS = ["tests.support.probe:ProbePlugin", "tests.support.probe:TallyPlugin"]
ASKS = [
    ("How do I make the Postgres database query fast?", ["An index makes a query fast. Cats purr.", "Vacuum the table often."]),
    ("Deploy the service to Kubernetes with a CI pipeline", ["Use a Deployment. A pipeline builds the container image."]),
    ("Write the docs for the JWT token security review", ["Tokens expire. The review found no vulnerability."]),
    ("Is the React page slow?", []),
]
RESULTS: dict[str, Any] = {}


def build_manifest(name: str, prefix: str, root: Path) -> dict[str, Any]:
    data = tomllib.loads((root / "manifests" / f"{name}.toml").read_text())
    data["system"]["subject_prefix"] = prefix
    if name == "monolith":
        next(iter(data["pods"].values()))["plugins"] += TEST_PLUGINS
    elif name == "consolidated":  # the front plugin where the gateway goes, jobs on the worker engine
        data["pods"].setdefault("unified-api-gateway", {"plugins": []})["plugins"] += TEST_PLUGINS[:1]
        data["pods"].setdefault("background-worker-engine", {"plugins": []})["plugins"] += TEST_PLUGINS[1:]
    else:
        data["pods"]["probe"] = {"plugins": TEST_PLUGINS[:1]}
        data["pods"]["tally"] = {"plugins": TEST_PLUGINS[1:]}
    return data


def spec_for(name: str, root: Path) -> tuple[SystemSpec, Placement]:
    """A shipped manifest as written (``manifest``), or a seeded random partition (``random:SEED``)
    of the monolith's plugins and the probe plugins (the gateway last, so it opens last)."""
    if name.startswith("random:"):
        data = tomllib.loads((root / "manifests" / "monolith.toml").read_text())
        plugins = [p for p in next(iter(data["pods"].values()))["plugins"] if p != "gateway"] + TEST_PLUGINS + ["gateway"]
        return SystemSpec(plugins=plugins, config=data["plugins"], system=data["system"]), Placement.parse(name)
    data = build_manifest(name, "aiwfe", root)
    plugins = list(dict.fromkeys(p for pod in data["pods"].values() for p in pod["plugins"]))
    return SystemSpec(plugins=plugins, config=data["plugins"], system=data["system"], pods=data["pods"]), Placement("manifest")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every shipped manifest, then a random placement per seed of ``--aiwfe-seeds``."""
    if "system" in metafunc.fixturenames:
        placements = [*PLACEMENTS, *(f"random:{s}" for s in seeds(metafunc.config))]
        metafunc.parametrize("system", placements, indirect=True)


class System(msgspec.Struct):
    """One placement, running: its name, an outside client kernel, the pod processes, the gateway."""

    placement: str
    kernel: Kernel
    pods: dict[str, Any]
    gateway_url: str
    co_located: bool  # the probe plugin runs in perception's pod


@pytest.fixture
async def system(
    request: pytest.FixtureRequest, prefix: str, pg_url: str, redis_url: str, tmp_path: Path, repo_root: Path
) -> AsyncIterator[System]:
    # aiwfe.testing runs the pods as `aiwfe run` children, authorization on: each pod as its own
    # user, this test's client as the operator; a permission violation fails the test
    spec, placement = spec_for(request.param, repo_root)
    env = {"DATABASE_URL": pg_url, "REDIS_URL": redis_url}
    async with start_system(spec, placement, tmp_path, prefix=prefix, env=env) as s:
        assert s.gateway_url is not None
        co_located = s.pod_of(TEST_PLUGINS[0]) == s.pod_of("perception")
        yield System(placement=request.param, kernel=s.kernel, pods=s.pods, gateway_url=s.gateway_url, co_located=co_located)


async def expected_answer(text: str, context: list[str]) -> dict[str, Any]:
    # the manifests' perception embedder: auto (semantic where its model is installed, else hashing)
    p = await PerceptionPlugin(PerceptionPlugin.Config(embedder="auto"), None).perceive(Perceive(text=text))  # type: ignore[arg-type]
    answer, confidence = extract("generalist", text, context, 3)
    return {"intent": p.intent, "tags": [e.tag for e in p.expertise], "answer": answer, "confidence": confidence}


def _count(metrics_text: str, contract: str, path: str) -> float:
    m = re.search(rf'aiwfe_handled_seconds_count{{contract="{re.escape(contract)}",path="{path}"}} ([0-9.e+]+)', metrics_text)
    return float(m.group(1)) if m else 0.0


@pytest.mark.timeout(180)
async def test_end_to_end(system: System) -> None:
    placement, k, pods = system.placement, system.kernel, system.pods
    # RPC through a front plugin that calls perception and reasoning
    answers = [msgspec.to_builtins(await k.call(Ask(text=t, context=c))) for t, c in ASKS]
    assert answers == [await expected_answer(t, c) for t, c in ASKS]

    # durable jobs, through two job consumers
    crunch_ids = [await k.submit(Crunch(n=i)) for i in range(40)]
    tally_ids = [await k.submit(Tally(n=i, delay_s=0.0)) for i in range(100)]
    recs = await asyncio.gather(*(k.wait_job(j, timeout_s=60) for j in crunch_ids + tally_ids))
    squares = [msgspec.msgpack.decode(r.result)["square"] for r in recs]
    assert squares == [i * i for i in range(40)] + [i * i for i in range(100)]
    assert all(r.attempts == 1 for r in recs)
    retried = await k.submit(Crunch(n=5, fail_times=2))
    rec = await k.wait_job(retried, timeout_s=30)
    assert (rec.status, rec.attempts) == ("done", 3)
    events = [ev.type async for ev in k.job_events(retried)]
    assert events == ["job.retrying", "job.retrying", "probe.progressed", "job.done"]

    # error semantics
    with pytest.raises(RemoteError) as e:
        await k.call(Boom(message="nope"))
    assert (e.value.type, e.value.message) == ("ValueError", "nope")
    with pytest.raises(DeadlineExceeded):
        await k.call(Sleep(seconds=3), timeout_s=0.2)

    async def slots_free() -> bool:  # probe.sleep: concurrency 2, queue 2 -- four at once fit only when idle
        got = await asyncio.gather(*(k.call(Sleep(seconds=0)) for _ in range(4)), return_exceptions=True)
        return not any(isinstance(r, BaseException) for r in got)

    assert await wait_until(slots_free, timeout_s=10)  # the timed-out sleep has let go of its slot
    burst = await asyncio.gather(*(k.call(Sleep(seconds=0.5)) for _ in range(8)), return_exceptions=True)
    assert sum(isinstance(r, Overloaded) for r in burst) == 4
    with pytest.raises(Unavailable):
        await k.call(Unserved(), timeout_s=2)

    # routing: in-process when co-located, over NATS otherwise
    served_by = {name: (await asyncio.to_thread(p.get, "/metrics"))[1].decode() for name, p in pods.items()}
    local = sum(_count(t, "perception.perceive", "local") for t in served_by.values())
    remote = sum(_count(t, "perception.perceive", "remote") for t in served_by.values())
    if system.co_located:
        assert (local, remote) == (len(ASKS), 0)
    else:
        assert (local, remote) == (0, len(ASKS))
    RESULTS[placement] = {"answers": answers, "squares": squares, "events": events}


def test_placements_agree() -> None:
    if not set(PLACEMENTS) <= set(RESULTS):
        pytest.skip("runs after the end-to-end test of every placement")
    first = RESULTS[PLACEMENTS[0]]
    assert all(r == first for r in RESULTS.values())


@pytest.mark.timeout(180)
async def test_helios_over_the_websocket(system: System) -> None:
    """A user registers, logs in, remembers something, asks helios over the WebSocket and
    sees every expert stream in and the result, under every placement."""
    import httpx

    from aiwfe.plugins.memory.contract import Remember
    from tests.support.gateway import recv_json, ws_connect

    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as c:
        token = await register_and_login(c, "wendy", "correct horse battery")
    from aiwfe.plugins.auth.contract import Verify

    claims = await system.kernel.call(Verify(token=token))
    await system.kernel.call(Remember(text="Wendy's database keeps a B-tree index on order_id.", owner=claims.sub))
    ws_url = system.gateway_url.replace("http://", "ws://") + "/v1/ws"
    async with ws_connect(ws_url, token) as ws:
        ask = {"text": "Which database index does my order table use?", "max_experts": 3, "owner": "someone-else"}
        await ws.send(msgspec.json.encode({"type": "submit", "kind": "helios", "input": ask, "id": "q1"}).decode())
        accepted = await recv_json(ws)
        assert accepted["type"] == "accepted" and accepted["id"] == "q1"
        events = []
        while (f := await recv_json(ws, 60))["type"] == "event":
            events.append(f["event"])
        assert f["type"] == "result" and f["status"] == "done", f
    assert events[:2] == ["helios.perceived", "helios.selected"]
    answered = events.count("helios.expert_answered")
    assert answered == events.count("helios.expert_started") == len(f["result"]["experts"]) > 0
    assert "reasoning.answer_streamed" in events
    assert "B-tree index on order_id" in f["result"]["answer"]  # recalled from wendy's memories, not someone-else's


@pytest.mark.timeout(120)
async def test_helios_quorum_and_token_budget(system: System) -> None:
    """min_answers and token_budget under every placement: the result and the events carry
    them, every expert's outcome is recorded, no more is spent than the budget."""
    from aiwfe.plugins.helios.contract import Ask as HeliosAsk

    ask = HeliosAsk(text="Secure the database and speed up its queries", max_experts=4, min_answers=2, token_budget=3000)
    job_id = await system.kernel.submit(ask)
    rec = await system.kernel.wait_job(job_id, timeout_s=60)
    assert rec.status == "done", rec.error
    result = msgspec.msgpack.decode(rec.result)
    assert (result["min_answers"], result["token_budget"]) == (2, 3000)
    statuses = [e["status"] for e in result["experts"]]
    assert statuses.count("answered") >= 2 and set(statuses) <= {"answered", "cancelled", "skipped"}, statuses
    assert result["tokens_spent"] == sum(e["tokens"] for e in result["experts"]) <= 3000
    events = [ev async for ev in system.kernel.job_events(job_id)]
    selected = next(ev.data for ev in events if ev.type == "helios.selected")
    assert (selected["min_answers"], selected["token_budget"]) == (2, 3000)
    assert sum(ev.type == "helios.expert_cancelled" for ev in events) == statuses.count("cancelled")


@pytest.mark.timeout(120)
async def test_memory_over_http_is_per_user(system: System) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=system.gateway_url, timeout=30) as c:
        tokens = {}
        for user in ("ann", "ben"):
            tokens[user] = {"Authorization": f"Bearer {await register_and_login(c, user, 'correct horse battery')}"}
        r = await c.post("/v1/memory", json={"text": "Ann's favourite database is PostgreSQL."}, headers=tokens["ann"])
        assert r.status_code == 201 and r.json()["id"]
        r = await c.post("/v1/memory/recall", json={"query": "favourite database"}, headers=tokens["ann"])
        assert [h["text"] for h in r.json()["hits"]] == ["Ann's favourite database is PostgreSQL."]
        r = await c.post("/v1/memory/recall", json={"query": "favourite database"}, headers=tokens["ben"])
        assert r.status_code == 200 and r.json()["hits"] == []
        assert (await c.post("/v1/memory/recall", json={"query": "x"})).status_code == 401
