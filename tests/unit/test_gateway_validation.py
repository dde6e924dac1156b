"""Bad input refused where it enters the gateway, on LocalBus with the test auth double:
job input decoded against the job's contract before the owner is recorded or the job
queued (400 / ``bad_input`` frames naming the field), unknown kinds listing the known ones,
bodies over the gateway's limit or the bus's max payload answered 413 with nothing
recorded. tests/integration/test_gateway_validation.py runs these bodies over real NATS."""

from __future__ import annotations

import json

import httpx

from tests.support.gateway import recv_json, ws_connect
from tests.unit.test_gateway_http import StartGateway, bearer, login
from tests.unit.test_gateway_http import gateway as gateway  # the fixture


async def _owner_of_keyed_job(s: object, token: str, kind: str, key: str) -> str | None:
    """The owner entry of the job a user's idempotency key names (None: nothing recorded)."""
    g = s.gateway  # type: ignore[attr-defined]
    claims = await g.handles.verify(token)
    kernel = s.pod.kernel  # type: ignore[attr-defined]
    return await kernel.job_owner(kernel._job_id(kind, None, f"{claims.sub}:{key}"))  # type: ignore[no-any-return]


async def test_http_job_input_is_validated_before_anything_is_recorded(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": "two"}, "idempotency_key": "k"}, headers=h)
        assert r.status_code == 400, r.text
        assert "bad_input" in r.json()["detail"] and "Expected `int`, got `str` - at `$.n`" in r.json()["detail"]
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {}, "idempotency_key": "k"}, headers=h)
        assert r.status_code == 400 and "missing required field `n`" in r.json()["detail"]
        assert await _owner_of_keyed_job(s, h["Authorization"][7:], "probe.crunch", "k") is None
        r = await c.post("/v1/jobs", json={"kind": "nosuch", "input": {}}, headers=h)
        assert r.status_code == 400 and "known: crunch, spew" in r.json()["detail"]
        # the same key then makes a job as usual
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}, "idempotency_key": "k"}, headers=h)
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        for _ in range(200):
            view = (await c.get(f"/v1/jobs/{job_id}", headers=h)).json()
            if view["status"] != "pending":
                break
        assert view["status"] == "done" and view["result"]["square"] == 4


async def test_http_bodies_over_the_limits_are_413_and_leave_nothing_pending(gateway: StartGateway) -> None:
    async with gateway("max_body_bytes = 4_000_000") as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        h = bearer(await login(c))
        text = "x" * 2_000_000  # fits the gateway's limit, not the bus's max payload
        body = {"kind": "crunch", "input": {"n": 1, "text": text}, "idempotency_key": "big"}
        r = await c.post("/v1/jobs", json=body, headers=h)
        assert r.status_code == 413 and "too_large" in r.json()["detail"], r.text
        assert "retry-after" not in r.headers
        assert await _owner_of_keyed_job(s, h["Authorization"][7:], "probe.crunch", "big") is None
        r = await c.post(
            "/v1/jobs", content=json.dumps({**body, "pad": "y" * 4_000_000}), headers={**h, "content-type": "application/json"}
        )
        assert r.status_code == 413
    async with gateway() as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:  # the default body limit (1 MiB)
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1, "text": "x" * 2_000_000}}, headers=h)
        assert r.status_code == 413


async def test_ws_submit_refuses_bad_input_and_unknown_kinds(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": 1.5}, "id": "a"}))
            f = await recv_json(ws)
            assert (f["type"], f["code"], f["id"]) == ("error", "bad_input", "a") and "$.n" in f["message"]
            await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {}, "id": "b", "idempotency_key": "w"}))
            f = await recv_json(ws)
            assert f["code"] == "bad_input" and "missing required field `n`" in f["message"]
            assert await _owner_of_keyed_job(s, token, "probe.crunch", "w") is None
            await ws.send(json.dumps({"type": "submit", "kind": "nope", "input": {}, "id": "c"}))
            f = await recv_json(ws)
            assert f["code"] == "unknown_kind" and "known: crunch, spew" in f["message"]
            await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": 3}, "id": "d"}))
            f = await recv_json(ws)
            assert f["type"] == "accepted" and f["id"] == "d"
