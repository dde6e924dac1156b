"""The gateway's HTTP surface on LocalBus with the test auth double.

tests/integration/test_gateway_http.py runs these bodies over real NATS (and the real
auth plugin when it is installed) by overriding the ``gateway`` fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from aiwfe.bus.local import LocalBus
from tests.support.gateway import GatewaySystem, gateway_manifest, run_system

StartGateway = Callable[..., contextlib.AbstractAsyncContextManager[GatewaySystem]]

PASSWORD = "correct horse battery"


@pytest.fixture
def gateway(prefix: str) -> StartGateway:
    """Start the one-pod gateway system on LocalBus (``extra`` = TOML for [plugins.gateway])."""

    @contextlib.asynccontextmanager
    async def start(extra: str = "", *, auth: str | None = None, more_plugins: str = "") -> AsyncIterator[GatewaySystem]:
        kw = {"auth": auth} if auth else {}
        text = gateway_manifest(prefix, gateway=extra, **kw)
        if more_plugins:
            text = text.replace('"reasoning"]', f'"reasoning", {more_plugins}]')
        async with run_system(text, LocalBus(prefix)) as s:
            yield s

    return start


async def login(c: httpx.AsyncClient, username: str = "alice") -> str:
    """Register (if needed) and log in ``username``; return the access token."""
    r = await c.post("/v1/auth/register", json={"username": username, "password": PASSWORD})
    assert r.status_code in (201, 409), r.text
    r = await c.post("/v1/auth/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"].lower() == "bearer" and body["expires_in"] > 0
    return str(body["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_register_login_logout_and_errors(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.post("/v1/auth/register", json={"username": "bob", "password": PASSWORD})
        assert r.status_code == 201 and r.json()["username"] == "bob"
        r = await c.post("/v1/auth/register", json={"username": "bob", "password": PASSWORD})
        assert r.status_code == 409 and "UserExists" in r.text
        r = await c.post("/v1/auth/login", json={"username": "bob", "password": "wrong password"})
        assert r.status_code == 401 and "InvalidCredentials" in r.text
        r = await c.post("/v1/auth/login", json={"username": "bob"})
        assert r.status_code == 400 and "password" in r.text
        token = await login(c, "bob")
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers=bearer(token))
        assert r.status_code == 202
        r = await c.post("/v1/auth/logout", headers=bearer(token))
        assert r.status_code == 200 and r.json()["jti"]
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers=bearer(token))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


async def test_jobs_need_a_valid_bearer_token(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}})
        assert r.status_code == 401 and "missing bearer token" in r.text
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers=bearer("not.a.token"))
        assert r.status_code == 401 and "InvalidToken" in r.text
        r = await c.get("/v1/jobs/abc", headers=bearer("not.a.token"))
        assert r.status_code == 401


async def test_submit_job_then_read_record_and_events(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "nope", "input": {}}, headers=h)
        assert r.status_code == 400 and "unknown job kind 'nope'" in r.text and "crunch" in r.text
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": "not an object"}, headers=h)
        assert r.status_code == 400
        r = await c.post("/v1/jobs", content=b"{not json", headers={**h, "Content-Type": "application/json"})
        assert r.status_code == 400

        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 7}, "idempotency_key": "k1"}, headers=h)
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        r2 = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 7}, "idempotency_key": "k1"}, headers=h)
        assert r2.json()["job_id"] == job_id

        r = await c.get(f"/v1/jobs/{job_id}/events", headers=h, timeout=20)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _parse_sse(r.text)
        assert events[0]["event"] == "probe.progressed" and events[-1]["event"] == "job.done"
        assert [int(str(e["id"])) for e in events] == sorted(int(str(e["id"])) for e in events)
        last: Any = events[-1]["data"]
        assert last["status"] == "done" and last["data"]["square"] == 49
        first_seq = int(events[0]["id"])

        # Last-Event-ID: continue after the first event, as a reconnecting EventSource does.
        r = await c.get(f"/v1/jobs/{job_id}/events", headers={**h, "Last-Event-ID": str(first_seq)}, timeout=20)
        assert _parse_sse(r.text) == events[1:]
        r = await c.get(f"/v1/jobs/{job_id}/events?token={h['Authorization'][7:]}&after_seq={first_seq}", timeout=20)
        assert _parse_sse(r.text) == events[1:]

        r = await c.get(f"/v1/jobs/{job_id}", headers=h)
        body = r.json()
        assert body["status"] == "done" and body["result"] == {"n": 7, "square": 49, "answer": "The square of 7 is 49."}

        r = await c.get("/v1/jobs/0123456789abcdef0123456789abcdef", headers=h)
        assert r.status_code == 404  # unknown, not pending


async def test_jobs_belong_to_their_user(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        alice, mallory = bearer(await login(c, "alice")), bearer(await login(c, "mallory"))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3, "owner": "mallory"}}, headers=alice)
        job_id = r.json()["job_id"]
        assert (await c.get(f"/v1/jobs/{job_id}", headers=alice)).status_code == 200
        assert (await c.get(f"/v1/jobs/{job_id}", headers=mallory)).status_code == 404
        assert (await c.get(f"/v1/jobs/{job_id}/events", headers=mallory)).status_code == 404
        # the same idempotency key from two users gives two jobs
        a = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1}, "idempotency_key": "same"}, headers=alice)
        m = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1}, "idempotency_key": "same"}, headers=mallory)
        assert a.json()["job_id"] != m.json()["job_id"]


async def test_failed_job_record_shows_the_error(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1, "fail_times": 9}}, headers=h)
        job_id = r.json()["job_id"]
        r = await c.get(f"/v1/jobs/{job_id}/events", headers=h, timeout=20)
        assert _parse_sse(r.text)[-1]["event"] == "job.failed"
        body = (await c.get(f"/v1/jobs/{job_id}", headers=h)).json()
        assert body["status"] == "failed" and body["error"]["type"] == "Flaky"


async def test_overloaded_auth_is_503_with_retry_after_at_once(gateway: StartGateway) -> None:
    async with gateway(auth="tests.support.gateway_probe:TightAuthPlugin") as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        loop = asyncio.get_running_loop()
        slow = asyncio.create_task(c.get("/v1/jobs/x", headers=bearer(token)))
        await asyncio.sleep(0.1)  # the slow verify holds the only slot
        t0 = loop.time()
        r = await c.get("/v1/jobs/x", headers=bearer(token))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "overloaded" in r.text
        assert loop.time() - t0 < 0.3  # at once, not after the slot frees up
        assert (await slow).status_code == 404  # past authentication: the job does not exist


async def test_ops_endpoints_schema_and_console(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        r = await c.get("/ready")
        assert r.status_code == 200 and r.json()["ready"] is True
        r = await c.get("/metrics")
        assert r.status_code == 200 and "aiwfe_ws_connections" in r.text and "aiwfe_ws_connect_seconds" in r.text
        schema = (await c.get("/schema/openapi.json")).json()
        for path in ("/v1/auth/register", "/v1/auth/login", "/v1/auth/logout", "/v1/jobs", "/v1/jobs/{job_id}"):
            assert path in schema["paths"], path
        r = await c.get("/")
        assert r.status_code == 200 and "AIWFE console" in r.text
        pods = (await c.get("/v1/pods")).json()
        assert pods[0]["ready"] is True and "gateway" in pods[0]["plugins"]


def _parse_sse(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body into ``[{id, event, data}]`` (``data`` decoded from JSON)."""
    out = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        ev: dict[str, Any] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            if key in ("id", "event"):
                ev[key] = value
            elif key == "data":
                ev["data"] = json.loads(value)
        if "data" in ev:
            out.append(ev)
    return out
