"""Authorization audit of the gateway: can user B, with a valid token, reach user A's things?

One pod on real NATS with the gateway, the real auth plugin (PostgreSQL + Redis; admin
``root``) and the memory plugin (PostgreSQL; hashing embedder), WebSocket ``call`` frames
allowed for ``memory.recall`` and ``memory.remember`` as well (a configuration the gateway's
``validate_config`` accepts and the README's "Gateway limits" table documents). Every route
and WebSocket command that takes an identifier is tried by B against A's job and memories, by
anyone against ids of the wrong shape and of jobs submitted straight on the bus (no owner), and
the answers for "not yours" are compared with those for "does not exist".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiwfe.bus.nats import NatsBus
from tests.support.gateway import (
    GatewaySystem,
    gateway_manifest,
    post_retrying,
    real_auth_config,
    recv_json,
    run_system,
    ws_connect,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

PASSWORD = "correct horse battery"
MISSING = "0123456789abcdef0123456789abcdef"  # a well-formed job id nobody submitted
WRONG_SHAPES = ["..", "a.b", "a*b", "x" * 129, "%00", "a b", "ä"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def system(prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path) -> Any:
    """Start the gateway pod (real auth, admin ``root``; memory with the hashing embedder)."""

    @contextlib.asynccontextmanager
    async def start(auth_extra: str = "") -> AsyncIterator[tuple[GatewaySystem, httpx.AsyncClient]]:
        auth = real_auth_config(pg_url, redis_url, prefix) + 'admin_users = ["root"]\n' + auth_extra
        ws_calls = 'ws_calls = ["perception.perceive", "memory.recall", "memory.remember"]'
        text = gateway_manifest(prefix, auth="auth", gateway=ws_calls, auth_config=auth)
        text = text.replace('"reasoning"]', '"reasoning", "memory"]')
        text += f'[plugins.memory]\ndatabase_url = "{pg_url}"\ndata_dir = "{tmp_path}"\ncollection = "{prefix}"\n'
        text += 'embedder = "hashing"\n'
        async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s:
            async with httpx.AsyncClient(base_url=s.url, timeout=20) as c:
                yield s, c

    return start


async def register(c: httpx.AsyncClient, name: str) -> tuple[str, str]:
    """Register and log in ``name``; ``(user id, token)``."""
    r = await post_retrying(c, "/v1/auth/register", {"username": name, "password": PASSWORD})
    assert r.status_code == 201, r.text
    user_id = str(r.json()["user_id"])
    r = await post_retrying(c, "/v1/auth/login", {"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return user_id, str(r.json()["access_token"])


async def ws_call(s: GatewaySystem, token: str, contract: str, input: dict[str, Any]) -> dict[str, Any]:
    """One WebSocket ``call`` frame; the reply or error frame."""
    async with ws_connect(s.ws_url, token) as ws:
        await ws.send(json.dumps({"type": "call", "id": "q", "contract": contract, "input": input}))
        return await recv_json(ws, 20.0)


async def recall_texts(c: httpx.AsyncClient, token: str, query: str) -> list[str]:
    r = await post_retrying(c, "/v1/memory/recall", {"query": query, "k": 20}, headers=bearer(token))
    assert r.status_code == 200, r.text
    return [h["text"] for h in r.json()["hits"]]


async def test_ws_call_frames_act_only_for_the_sockets_user(system: Any) -> None:
    """A ``call`` frame of ``memory.recall`` / ``memory.remember`` acts for the socket's user only.

    Before the fix, ``Commands._call`` sent the frame's input as it came, ``owner`` included:
    B read A's memories (``memory.recall`` with ``owner`` = A's user id answered A's secret) and
    stored memories as A (``memory.remember`` with ``owner`` = A: A's own recall then returned
    B's planted text), while the HTTP routes always set the owner to the token's subject.
    Failed 3 of 3 runs at the first assertion.
    """
    async with system() as (s, c):
        alice_id, alice = await register(c, "alice")
        _, bob = await register(c, "bob")
        r = await c.post("/v1/memory", json={"text": "Alice's vault code is 4711."}, headers=bearer(alice))
        assert r.status_code == 201, r.text
        f = await ws_call(s, bob, "memory.recall", {"query": "vault code", "owner": alice_id, "k": 10})
        assert f["type"] == "reply", f
        assert not any("4711" in h["text"] for h in f["result"]["hits"]), f  # A's memory stays A's
        f = await ws_call(s, bob, "memory.remember", {"text": "Alice's vault code changed to 0000.", "owner": alice_id})
        assert f["type"] == "reply", f
        assert not any("0000" in t for t in await recall_texts(c, alice, "vault code"))  # nothing planted in A's
        assert any("0000" in t for t in await recall_texts(c, bob, "vault code"))  # it is B's own memory
        # A's own call frames still reach A's memories (the owner is the socket's user whatever was sent).
        f = await ws_call(s, alice, "memory.recall", {"query": "vault code", "owner": "someone-else"})
        assert [h["text"] for h in f["result"]["hits"]] == ["Alice's vault code is 4711."], f


def same_answer(a: httpx.Response, b: httpx.Response, a_id: str, b_id: str) -> None:
    """``a`` (for ``a_id``) and ``b`` (for ``b_id``) are the same answer, ids aside."""
    assert a.status_code == b.status_code, (a.status_code, a.text, b.status_code, b.text)
    assert a.text.replace(a_id, "ID") == b.text.replace(b_id, "ID"), (a.text, b.text)


async def job_answers(c: httpx.AsyncClient, h: dict[str, str], job_id: str) -> list[httpx.Response]:
    """Every HTTP route that takes a job id, for ``job_id``."""
    return [
        await c.get(f"/v1/jobs/{job_id}", headers=h),
        await c.head(f"/v1/jobs/{job_id}", headers=h),
        await c.get(f"/v1/jobs/{job_id}/events", headers=h),
        await c.get(f"/v1/jobs/{job_id}/events?after_seq=1", headers={**h, "Last-Event-ID": "2"}),
        await c.get(f"/v1/jobs/{job_id}/events?token={h['Authorization'][7:]}"),
        await c.get(f"/v1/console/jobs/{job_id}", headers=h),
        await c.post("/v1/console/jobs", json={"job_id": job_id, "kind": "crunch"}, headers=h),
    ]


async def ws_answers(s: GatewaySystem, token: str, job_id: str) -> list[dict[str, Any]]:
    """The ``resume`` and ``cancel`` frames' answers for ``job_id``."""
    out = []
    async with ws_connect(s.ws_url, token) as ws:
        for frame in ({"type": "resume", "job_id": job_id, "id": "r"}, {"type": "cancel", "job_id": job_id, "id": "c"}):
            await ws.send(json.dumps(frame))
            out.append(await recv_json(ws, 20.0))
    return out


async def test_another_users_job_answers_as_no_job_on_every_route(system: Any) -> None:
    """B gets for A's jobs (running and finished), for jobs submitted on the bus (no owner, and
    the submit subject's ``~submit``) exactly what any user gets for a job that does not exist:
    404 with the same body on every HTTP route, ``not_found`` on every WebSocket command; ids of
    the wrong shape the same; A's job is left untouched (not cancelled, not listed for B)."""
    async with system() as (s, c):
        _, alice = await register(c, "alice")
        _, bob = await register(c, "bob")
        a, b = bearer(alice), bearer(bob)
        running = (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2, "delay_s": 30}}, headers=a)).json()
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3}, "idempotency_key": "k"}, headers=a)
        finished = r.json()["job_id"]
        for _ in range(100):
            if (await c.get(f"/v1/jobs/{finished}", headers=a)).json()["status"] == "done":
                break
            await asyncio.sleep(0.1)
        assert (await c.post("/v1/console/jobs", json={"job_id": finished, "kind": "crunch"}, headers=a)).status_code == 201
        kernel = s.pod.kernel
        no_owner = await kernel.submit_json("probe.crunch", b'{"n": 4}')
        submitted = await kernel.submit_json("probe.crunch", b'{"n": 5}', owner="~submit")
        missing = await job_answers(c, b, MISSING)
        assert {r.status_code for r in missing} == {404}, [(r.status_code, r.text) for r in missing]
        ws_missing = await ws_answers(s, bob, MISSING)
        assert [f["code"] for f in ws_missing] == ["not_found", "not_found"], ws_missing
        for job_id in (running["job_id"], finished, no_owner, submitted):
            for got, want in zip(await job_answers(c, b, job_id), missing, strict=True):
                same_answer(got, want, job_id, MISSING)
            for got_f, want_f in zip(await ws_answers(s, bob, job_id), ws_missing, strict=True):
                assert json.dumps(got_f).replace(job_id, "ID") == json.dumps(want_f).replace(MISSING, "ID")
        for bad in WRONG_SHAPES:
            for who in (a, b):
                r = await c.get(f"/v1/jobs/{bad}", headers=who)
                assert r.status_code == 404, (bad, r.status_code, r.text)
                r = await c.get(f"/v1/jobs/{bad}/events", headers=who)
                assert r.status_code == 404, (bad, r.status_code, r.text)
                assert (await c.get(f"/v1/console/jobs/{bad}", headers=who)).status_code == 404
        # B's resubmission with A's idempotency key is B's own job; A's is not touched.
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3}, "idempotency_key": "k"}, headers=b)
        assert r.status_code == 202 and r.json()["job_id"] not in (finished, running["job_id"]), r.text
        assert (await c.get(f"/v1/jobs/{running['job_id']}", headers=a)).json()["status"] == "pending"
        assert [e["job_id"] for e in (await c.get("/v1/console/jobs", headers=b)).json()] == []
        assert [e["job_id"] for e in (await c.get("/v1/console/jobs", headers=a)).json()] == [finished]
        assert (await c.get(f"/v1/jobs/{finished}", headers=a)).json()["result"]["square"] == 9


async def test_admin_routes_refuse_users_and_disabled_users_lose_everything(system: Any) -> None:
    """Admin routes answer 403 to a user who is not an admin (also one named like the admin in
    another case, which cannot be registered) and leave the target alone; a disabled user's
    token answers 401 on every route and is refused at the WebSocket handshake."""
    async with system() as (s, c):
        _, root = await register(c, "root")
        _, alice = await register(c, "alice")
        _, bob = await register(c, "bob")
        a, b = bearer(alice), bearer(bob)
        r = await post_retrying(c, "/v1/auth/register", {"username": "ROOT", "password": PASSWORD})
        assert r.status_code == 409, r.text
        job = (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers=a)).json()["job_id"]
        for method, path in [
            ("POST", "/v1/admin/users/alice/disable"),
            ("POST", "/v1/admin/users/alice/enable"),
            ("DELETE", "/v1/admin/users/alice"),
            ("POST", "/v1/admin/users/nobody-at-all/disable"),
            ("GET", "/v1/admin/dead-letters"),
            ("GET", "/v1/admin/dead-letters?kind=probe.crunch"),
            ("POST", f"/v1/admin/dead-letters/{job}/replay"),
            ("POST", f"/v1/admin/dead-letters/{MISSING}/replay"),
        ]:
            r = await c.request(method, path, headers=b)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert (await c.get("/v1/console/me", headers=a)).json() == {"username": "alice", "admin": False}
        r = await c.post("/v1/admin/users/alice/disable", headers=bearer(root))
        assert r.status_code == 200 and r.json()["disabled"] is True, r.text
        for method, path in [
            ("GET", f"/v1/jobs/{job}"),
            ("GET", f"/v1/jobs/{job}/events"),
            ("GET", f"/v1/console/jobs/{job}"),
            ("GET", "/v1/console/jobs"),
            ("GET", "/v1/console/me"),
            ("POST", "/v1/jobs"),
            ("POST", "/v1/memory/recall"),
            ("POST", "/v1/admin/users/bob/disable"),
            ("GET", "/v1/admin/dead-letters"),
        ]:
            body = {"kind": "crunch", "input": {"n": 1}} if path == "/v1/jobs" else {"query": "x"}
            r = await c.request(method, path, headers=a, json=body if method == "POST" else None)
            assert r.status_code == 401, (method, path, r.status_code, r.text)
        with pytest.raises(Exception, match="403"):
            async with ws_connect(s.ws_url, alice):
                pass
        assert (await c.get("/v1/console/me", headers=b)).status_code == 200


async def sse_events_after(c: httpx.AsyncClient, token: str, job_id: str, cut_off: Any) -> tuple[int, int]:
    """Read the job's event stream; run ``cut_off()`` at its first event. ``(events read, events read more
    than 1 s after the cut-off)``, the stream ended by the gateway within 20 s either way."""
    got: list[float] = []
    t_cut = 0.0
    async with asyncio.timeout(20), c.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(token)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("event:"):
                got.append(time.monotonic())
                if not t_cut:
                    await cut_off()
                    t_cut = time.monotonic()
    return len(got), sum(1 for t in got if t > t_cut + 1.0)


@pytest.mark.parametrize("how", ["disable", "delete", "logout"])
async def test_an_event_stream_ends_when_its_user_or_token_is_cut_off(system: Any, how: str) -> None:
    """An open ``GET /v1/jobs/{id}/events`` stream ends when its user is disabled or deleted or its
    token is revoked, as the user's WebSockets close with 4001, and gives its slot back.

    Before the fix the stream was authorised once, at its start: after ``disable`` the disabled user
    kept receiving all of the job's events to ``job.done`` (41 events, 31 of them more than 1 s after
    the cut-off; failed 3 of 3 runs for each of disable, delete and logout).
    """
    async with system() as (s, c):
        _, root = await register(c, "root")
        _, alice = await register(c, "alice")
        job = await c.post("/v1/jobs", json={"kind": "spew", "input": {"count": 40, "every_s": 0.1}}, headers=bearer(alice))
        job_id = job.json()["job_id"]

        async def cut_off() -> None:
            if how == "logout":
                r = await c.post("/v1/auth/logout", headers=bearer(alice))
            elif how == "delete":
                r = await c.delete("/v1/admin/users/alice", headers=bearer(root))
            else:
                r = await c.post("/v1/admin/users/alice/disable", headers=bearer(root))
            assert r.status_code == 200, r.text

        read, late = await sse_events_after(c, alice, job_id, cut_off)
        assert late == 0 and read < 30, (read, late)
        hub = s.gateway.handles.hub
        for _ in range(50):
            if not hub.streams and not hub.per_sub:
                break
            await asyncio.sleep(0.1)
        assert not hub.streams and not hub.per_sub, (hub.streams, hub.per_sub)


async def test_an_event_stream_of_another_token_or_user_goes_on(system: Any) -> None:
    """Cutting off one token or user ends only its own streams: the same user's stream under another
    token goes on after a logout, and another user's after a disable."""
    async with system() as (_s, c):
        _, root = await register(c, "root")
        _, alice = await register(c, "alice")
        _, bob = await register(c, "bob")
        r = await post_retrying(c, "/v1/auth/login", {"username": "alice", "password": PASSWORD})
        alice2 = str(r.json()["access_token"])
        spew = {"kind": "spew", "input": {"count": 20, "every_s": 0.1}}
        a_job = (await c.post("/v1/jobs", json=spew, headers=bearer(alice2))).json()["job_id"]
        b_job = (await c.post("/v1/jobs", json=spew, headers=bearer(bob))).json()["job_id"]

        async def logout_alice() -> None:
            assert (await c.post("/v1/auth/logout", headers=bearer(alice))).status_code == 200

        async def disable_alice() -> None:
            assert (await c.post("/v1/admin/users/alice/disable", headers=bearer(root))).status_code == 200

        assert (await sse_events_after(c, alice2, a_job, logout_alice))[0] == 21  # every event and job.done
        assert (await sse_events_after(c, bob, b_job, disable_alice))[0] == 21


async def test_an_event_stream_ends_when_its_token_expires(system: Any) -> None:
    """A stream ends when its token expires (tokens live 3 s here), as a WebSocket closes with 4001.

    Before the fix it ran on to ``job.done`` with the expired token: 61 events over 6 s (failed 3 of 3 runs)."""
    async with system("access_ttl_s = 3\nleeway_s = 0\n") as (_s, c):
        _, alice = await register(c, "alice")
        job = await c.post("/v1/jobs", json={"kind": "spew", "input": {"count": 60, "every_s": 0.1}}, headers=bearer(alice))
        t0 = time.monotonic()

        async def nothing() -> None:
            pass

        read, _ = await sse_events_after(c, alice, job.json()["job_id"], nothing)
        assert read < 45 and time.monotonic() - t0 < 4.5, read
