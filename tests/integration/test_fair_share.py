"""Fair share over a real NATS server (helios with PostgreSQL and Redis): server-side caps on
client budgets and per-user job slots shared by two gateway pods (aiwfe.kernel.quotas).

One user floods helios with jobs at the caps: past its slots it gets 429 with Retry-After
(HTTP), a ``too_many_jobs`` frame (WebSocket), from either gateway; meanwhile another user's
ordinary job is accepted and done. The NATS submit subjects share one pool: ``Overloaded``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR
from tests.support.auth_double import make_token
from tests.support.gateway import AUTH_DOUBLE, recv_json, ws_connect
from tests.support.pods import running

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

LIMIT = 8  # helios.ask's own max_jobs_per_owner (the gateway pods learn it from the consumer's answer)
MANIFEST = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 2
[system.jobs."helios.ask"]
max_submitted = 2
caps = {{ latency_s = 10 }}
[pods.brain]
plugins = ["memory", "learning", "perception", "reasoning", "helios"]
[pods.edge1]
plugins = ["gateway", "{auth}"]
[pods.edge2]
plugins = ["gateway", "{auth}"]
[plugins.gateway]
port = 0
job_kinds = {{ helios = "helios.ask" }}
[plugins.helios]
database_url = "{db}"
redis_url = "{redis}"
cache_prefix = "{prefix}:"
[plugins.memory]
database_url = "{db}"
data_dir = "{data}"
collection = "{prefix}"
[plugins.learning]
database_url = "{db}"
"""

#: A flooder's job: every budget at its cap, experts that take seconds.
FLOOD = {"text": "Design the database security and performance", "max_experts": 6, "deadline_s": 120.0}
FLOOD |= {"expert_timeout_s": 30.0, "latency_s": 3.0, "use_cache": False}


def _manifest(prefix: str, db: str, redis: str, data: Path) -> str:
    return MANIFEST.format(prefix=prefix, auth=AUTH_DOUBLE, db=db, redis=redis, data=data)


async def _wait_done(c: httpx.AsyncClient, job_id: str, token: str, timeout_s: float = 60.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            r = await c.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] != "pending":
                return body
            await asyncio.sleep(0.1)


async def test_a_flooding_user_gets_429_while_another_users_job_completes(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running(_manifest(prefix, pg_url, redis_url, tmp_path), nats_url=nats_url) as pods:
        urls = [str(pods[p].plugins["gateway"].public_url) for p in ("edge1", "edge2")]  # type: ignore[attr-defined]
        flooder, other = make_token("flooder", username="flooder"), make_token("other", username="other")
        edges = [httpx.AsyncClient(base_url=u, timeout=30) for u in urls]
        try:
            h = {"Authorization": f"Bearer {flooder}"}
            # over a cap: refused at submit, the field, its value and the cap named
            r = await edges[0].post("/v1/jobs", json={"kind": "helios", "input": {**FLOOD, "max_experts": 12}}, headers=h)
            assert r.status_code == 400 and "max_experts = 12 is over its cap (6)" in r.text, r.text
            r = await edges[1].post("/v1/jobs", json={"kind": "helios", "input": {**FLOOD, "latency_s": 40}}, headers=h)
            assert r.status_code == 400 and "latency_s = 40 is over its cap (10)" in r.text, r.text
            quorum = {"text": "x", "min_answers": 5, "max_experts": 2}
            r = await edges[0].post("/v1/jobs", json={"kind": "helios", "input": quorum}, headers=h)
            assert r.status_code == 400 and "min_answers = 5 is over its cap (max_experts = 2)" in r.text, r.text

            # the flood: 50 jobs at the caps through both gateways at once
            async def flood(i: int) -> httpx.Response:
                body = {"kind": "helios", "input": {**FLOOD, "text": f"{FLOOD['text']} #{i}"}}
                return await edges[i % 2].post("/v1/jobs", json=body, headers=h)

            answers = await asyncio.gather(*(flood(i) for i in range(50)))
            accepted = [a.json()["job_id"] for a in answers if a.status_code == 202]
            refused = [a for a in answers if a.status_code == 429]
            assert len(accepted) == LIMIT and len(refused) == 50 - LIMIT, [a.status_code for a in answers]
            assert all(int(a.headers["retry-after"]) >= 1 and "too_many_jobs" in a.text for a in refused)

            # the WebSocket says the same with an error frame, and never hangs
            async with ws_connect(urls[1].replace("http://", "ws://") + "/v1/ws", flooder) as ws:
                await ws.send(json.dumps({"type": "submit", "id": "s1", "kind": "helios", "input": FLOOD}))
                frame = await recv_json(ws)
                assert frame["type"] == "error" and frame["code"] == "too_many_jobs" and frame["retry_after_s"] > 0, frame

            # meanwhile another user's ordinary job is accepted and done
            ho = {"Authorization": f"Bearer {other}"}
            r = await edges[1].post("/v1/jobs", json={"kind": "helios", "input": {"text": "How are orders indexed?"}}, headers=ho)
            assert r.status_code == 202, r.text
            done = await _wait_done(edges[1], r.json()["job_id"], other)
            assert done["status"] == "done" and done["result"]["answer"], done

            # the flooder's slots free themselves as its jobs finish: it may submit again
            for job_id in accepted:
                await _wait_done(edges[0], job_id, flooder)
            r = await edges[0].post("/v1/jobs", json={"kind": "helios", "input": {"text": "again"}}, headers=h)
            assert r.status_code == 202, r.text
        finally:
            for c in edges:
                await c.aclose()


async def test_the_nats_submit_subject_is_one_pool_answering_overloaded(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with running(_manifest(prefix, pg_url, redis_url, tmp_path), nats_url=nats_url):
        nc = await nats.connect(nats_url)
        try:
            subject, headers = f"{prefix}.submit.helios.ask", {H_CONTENT_TYPE: "application/json"}

            async def submit(job: dict[str, Any]) -> Any:
                return await nc.request(subject, json.dumps(job).encode(), timeout=10, headers=headers)

            over = await submit({**FLOOD, "deadline_s": 3600})
            err = json.loads(over.headers[H_ERROR])
            assert err["type"] == "BadInput" and "deadline_s = 3600 is over its cap (120)" in err["message"], err
            replies = [await submit({**FLOOD, "text": f"nats {i}"}) for i in range(3)]
            assert [H_ERROR in (m.headers or {}) for m in replies] == [False, False, True]
            err = json.loads(replies[2].headers[H_ERROR])
            assert err["type"] == "Overloaded" and err["retryable"] and err["retry_after_s"] > 0, err
        finally:
            await nc.close()


async def test_pods_reclaiming_the_same_stale_slots_at_once_never_admit_more_than_the_limit(prefix: str, nats_url: str) -> None:
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.quotas import JobLimits, JobQuotas, TooManyJobs

    finished: set[str] = set()

    async def is_finished(job_id: str) -> bool:
        return job_id in finished

    buses = [NatsBus(nats_url, prefix, name=f"q{i}") for i in range(4)]
    await asyncio.gather(*(b.start() for b in buses))
    try:
        pods = [JobQuotas(b, is_finished, {"work": JobLimits(max_per_owner=4)}) for b in buses]
        for i in range(4):
            await pods[i].acquire("work", "u", f"old{i}", 60)
        finished.update(f"old{i}" for i in range(4))  # every slot's job has an outcome now

        async def submit(i: int) -> bool:
            try:
                await pods[i % 4].acquire("work", "u", f"new{i}", 60)
            except TooManyJobs:
                return False
            return True

        assert sum(await asyncio.gather(*(submit(i) for i in range(40)))) == 4
    finally:
        await asyncio.gather(*(b.close() for b in buses))
