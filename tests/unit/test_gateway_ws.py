"""The gateway's WebSocket endpoint on LocalBus with the test auth double.

Every handshake rejection, revocation (4001), Origin, frame size (1009), flood (1008),
slow reader (1013) and the job protocol: submit, events, result, resume, cancel.
tests/integration/test_gateway_ws.py runs these bodies over real NATS.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from aiwfe.plugins.gateway._metrics import WS_CLOSED, WS_CONNECT_FAILURES, WS_CONNECTIONS
from tests.support.gateway import raw_ws_open, raw_ws_send_text, recv_json, ws_connect
from tests.unit.test_gateway_http import StartGateway, bearer, login
from tests.unit.test_gateway_http import gateway as gateway  # the fixture


@pytest.fixture
def forge() -> dict[str, str]:
    """Tokens the verifier must refuse, by name (the auth double's key and claims)."""
    from tests.support.auth_double import make_token

    return {
        "expired": make_token(ttl_s=-60),
        "forged": make_token(secret="another-secret-0123456789abcdef0123456789"),
        "alg_none": make_token(algorithm="none"),
        "wrong_audience": make_token(audience="somebody-else"),
        "garbage": "not-a-jwt",
    }


def _failures(reason: str) -> float:
    return WS_CONNECT_FAILURES.labels(reason)._value.get()


def _closed(code: int) -> float:
    return WS_CLOSED.labels(str(code))._value.get()


async def _expect_refused(url: str, token: str | None, *, how: str = "header", **kw: Any) -> None:
    with pytest.raises(InvalidStatus) as e:
        async with ws_connect(url, token, how=how, **kw):
            pass
    assert e.value.response.status_code == 403


async def _closed_with(ws: Any, timeout_s: float = 5.0) -> int | None:
    """Read until the server closes; return the close code."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                await ws.recv()
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None


async def test_token_in_header_query_or_subprotocol(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        for how in ("header", "query", "subprotocol"):
            async with ws_connect(s.ws_url, token, how=how) as ws:
                assert ws.subprotocol == ("bearer" if how == "subprotocol" else None)
                await ws.send(json.dumps({"type": "ping", "id": how}))
                assert await recv_json(ws) == {"type": "pong", "id": how}


async def test_every_bad_token_is_refused_at_the_handshake(gateway: StartGateway, forge: dict[str, str]) -> None:
    async with gateway() as s:
        before = _failures("no_token")
        await _expect_refused(s.ws_url, None)
        assert _failures("no_token") == before + 1
        for name, token in forge.items():
            before = _failures("invalid_token")
            for how in ("header", "query", "subprotocol"):
                await _expect_refused(s.ws_url, token, how=how)
            assert _failures("invalid_token") == before + 3, name


async def test_revoked_token_closes_open_sockets_with_4001(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        other = await login(c, "carol")
        async with ws_connect(s.ws_url, token) as a, ws_connect(s.ws_url, token, how="query") as b:
            async with ws_connect(s.ws_url, other) as neighbour:
                t0 = time.monotonic()
                assert (await c.post("/v1/auth/logout", headers=bearer(token))).status_code == 200
                assert await _closed_with(a) == 4001
                assert await _closed_with(b) == 4001
                assert time.monotonic() - t0 < 3.0
                await neighbour.send(json.dumps({"type": "ping"}))
                assert (await recv_json(neighbour))["type"] == "pong"
        await _expect_refused(s.ws_url, token)


async def test_origin_allowlist(gateway: StartGateway) -> None:
    async with gateway('allowed_origins = ["https://good.example"]') as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        before = _failures("origin")
        await _expect_refused(s.ws_url, token, origin="https://evil.example")
        assert _failures("origin") == before + 1
        async with ws_connect(s.ws_url, token, origin="https://good.example") as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"
        async with ws_connect(s.ws_url, token, origin=s.url) as ws:  # the console's own origin
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"


async def test_oversized_frame_closes_1009_and_neighbours_carry_on(gateway: StartGateway) -> None:
    async with gateway("max_frame_bytes = 1024") as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as big, ws_connect(s.ws_url, token) as neighbour:
            await big.send(json.dumps({"type": "ping", "id": "x" * 4096}))
            assert await _closed_with(big) == 1009
            await neighbour.send(json.dumps({"type": "ping", "id": "n"}))
            assert await recv_json(neighbour) == {"type": "pong", "id": "n"}


async def test_flood_is_rate_limited_then_closed_1008(gateway: StartGateway) -> None:
    cfg = "rate_per_s = 5.0\nrate_burst = 5\nrate_strikes = 3"
    async with gateway(cfg) as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws, ws_connect(s.ws_url, token) as neighbour:
            for i in range(30):
                try:
                    await ws.send(json.dumps({"type": "ping", "id": str(i)}))
                except ConnectionClosed:
                    break
            frames: list[dict[str, Any]] = []
            code = None
            try:
                async with asyncio.timeout(5):
                    while True:
                        frames.append(json.loads(await ws.recv()))
            except ConnectionClosed as e:
                code = e.rcvd.code if e.rcvd else None
            assert code == 1008
            kinds = [f.get("code", f["type"]) for f in frames]
            assert kinds[:5] == ["pong"] * 5
            assert kinds[5:] == ["rate_limited"] * 3
            assert all(f["retry_after_s"] > 0 for f in frames[5:])
            await neighbour.send(json.dumps({"type": "ping"}))
            assert (await recv_json(neighbour))["type"] == "pong"


@pytest.mark.parametrize(
    "cfg",
    [
        "send_queue_size = 8\nslow_reader_timeout_s = 1.0",
        # Bounded in bytes too: 4,000 frames of 4 KB fit 10,000 frames, not 64 KiB. Before the byte
        # bound the whole job (16 MB) was queued for the reader and nothing closed it.
        "send_queue_size = 10000\nsend_queue_bytes = 65536\nslow_reader_timeout_s = 1.0",
    ],
    ids=["frames", "bytes"],
)
async def test_slow_reader_is_closed_1013_and_others_are_not_stalled(gateway: StartGateway, cfg: str) -> None:
    async with gateway(cfg) as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        # A reader with a tiny receive buffer that stops reading: the server's socket fills up.
        before = _closed(1013)
        _, slow = await raw_ws_open(s.ws_url, token)
        async with ws_connect(s.ws_url, token) as fast:
            raw_ws_send_text(slow, json.dumps({"type": "submit", "kind": "spew", "input": {"count": 4000, "size": 4000}}))
            worst_s = 0.0
            deadline = time.monotonic() + 20
            while _closed(1013) == before and time.monotonic() < deadline:
                t0 = time.monotonic()
                await fast.send(json.dumps({"type": "ping"}))
                assert (await recv_json(fast))["type"] == "pong"
                worst_s = max(worst_s, time.monotonic() - t0)
                await asyncio.sleep(0.05)
            assert _closed(1013) == before + 1
            assert worst_s < 0.5
            # The fast neighbour also gets a whole job's events meanwhile.
            await fast.send(json.dumps({"type": "submit", "kind": "spew", "input": {"count": 200, "size": 100}, "id": "f"}))
            frames = [await recv_json(fast) for _ in range(202)]
            assert frames[0]["type"] == "accepted" and frames[-1]["type"] == "result" and frames[-1]["result"] == {"count": 200}
        slow.close()


async def test_submit_streams_events_and_result_then_resume_after_reconnect(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(json.dumps({"type": "submit", "kind": "spew", "input": {"count": 6, "every_s": 0.2}, "id": "c1"}))
            accepted = await recv_json(ws)
            assert accepted["type"] == "accepted" and accepted["id"] == "c1"
            job_id = accepted["job_id"]
            first = [await recv_json(ws) for _ in range(2)]
        assert [f["data"]["i"] for f in first] == [0, 1]
        last_seq = first[-1]["seq"]
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(json.dumps({"type": "resume", "job_id": job_id, "after_seq": last_seq}))
            rest = []
            while True:
                f = await recv_json(ws)
                rest.append(f)
                if f["type"] == "result":
                    break
        assert [f["data"]["i"] for f in rest[:-1]] == [2, 3, 4, 5]
        assert all(f["seq"] > last_seq for f in rest)
        assert rest[-1] == {"type": "result", "job_id": job_id, "seq": rest[-1]["seq"], "status": "done", "result": {"count": 6}}


async def test_cancel_on_disconnect_and_cancel_frame(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        h = bearer(token)
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "submit",
                        "kind": "crunch",
                        "input": {"n": 3, "delay_s": 30},
                        "cancel_on_disconnect": True,
                        "id": "d",
                    }
                )
            )
            await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": 4, "delay_s": 30}, "id": "k"}))
            accepted: dict[str, str] = {}
            while len(accepted) < 2:
                f = await recv_json(ws)
                if f["type"] == "accepted":
                    accepted[f["id"]] = f["job_id"]
            doomed, kept = accepted["d"], accepted["k"]
        for _ in range(100):
            if (await c.get(f"/v1/jobs/{doomed}", headers=h)).json()["status"] == "cancelled":
                break
            await asyncio.sleep(0.05)
        assert (await c.get(f"/v1/jobs/{doomed}", headers=h)).json()["status"] == "cancelled"
        assert (await c.get(f"/v1/jobs/{kept}", headers=h)).json()["status"] == "pending"
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(json.dumps({"type": "cancel", "job_id": kept, "id": "x"}))
            assert await recv_json(ws) == {"type": "cancelled", "id": "x", "job_id": kept, "cancelled": True}
            await ws.send(json.dumps({"type": "resume", "job_id": kept}))
            frames: list[dict[str, Any]] = []
            while not frames or frames[-1]["type"] != "result":
                frames.append(await recv_json(ws))
            assert frames[-1]["status"] == "cancelled"


async def test_bad_frames_unknown_kinds_and_calls(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send("{not json")
            assert (await recv_json(ws))["code"] == "bad_frame"
            await ws.send(json.dumps({"type": "launch"}))
            assert (await recv_json(ws))["code"] == "bad_frame"
            await ws.send(json.dumps({"type": "submit", "kind": "nope", "id": "a"}))
            f = await recv_json(ws)
            assert f["code"] == "unknown_kind" and "crunch" in f["message"] and f["id"] == "a"
            await ws.send(json.dumps({"type": "call", "contract": "auth.login", "input": {}, "id": "b"}))
            assert (await recv_json(ws))["code"] == "unknown_contract"
            await ws.send(json.dumps({"type": "call", "contract": "perception.perceive", "input": {"txt": 1}, "id": "c"}))
            assert (await recv_json(ws))["code"] == "bad_frame"
            for bad_input in (5, None, [], "text"):  # the input is decoded straight into the contract: an object only
                await ws.send(json.dumps({"type": "call", "contract": "perception.perceive", "input": bad_input, "id": "e"}))
                f = await recv_json(ws)
                assert f["code"] == "bad_frame" and f["id"] == "e" and "Expected `object`" in f["message"], f
            await ws.send(
                json.dumps({"type": "call", "contract": "perception.perceive", "input": {"text": "Deploy it"}, "id": "d"})
            )
            f = await recv_json(ws)
            assert f["type"] == "reply" and f["id"] == "d" and f["result"]["intent"] == "command"


async def test_idle_timeout_and_connection_gauge(gateway: StartGateway) -> None:
    async with gateway("idle_timeout_s = 0.5") as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        base = WS_CONNECTIONS._value.get()
        async with ws_connect(s.ws_url, token) as ws:
            await asyncio.sleep(0.1)
            assert WS_CONNECTIONS._value.get() == base + 1
            assert await _closed_with(ws) == 1000
        for _ in range(50):
            if WS_CONNECTIONS._value.get() == base:
                break
            await asyncio.sleep(0.02)
        assert WS_CONNECTIONS._value.get() == base


async def test_sockets_close_1001_when_the_gateway_stops(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        ws = await websockets.connect(s.ws_url, additional_headers=bearer(token))
    assert await _closed_with(ws) == 1001


@pytest.fixture
def short_lived_token() -> str:
    """A valid token that expires in 2 s (the auth double's key)."""
    from tests.support.auth_double import make_token

    return make_token(ttl_s=2)


async def test_socket_closes_4001_when_its_token_expires(gateway: StartGateway, short_lived_token: str) -> None:
    async with gateway() as s:
        async with ws_connect(s.ws_url, short_lived_token) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"
            assert await _closed_with(ws, timeout_s=5) == 4001


async def test_followed_jobs_per_socket_are_bounded(gateway: StartGateway) -> None:
    # no per-user job limit for crunch here (its default, 64, would refuse the 65th submission first)
    no_quota = 'rate_burst = 200\n[system.jobs."probe.crunch"]\nmax_per_owner = 0'
    async with gateway(no_quota) as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            for i in range(65):  # jobs that outlive the test, submitted one by one: all followed at once
                await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": i, "delay_s": 60}, "id": str(i)}))
                while (f := await recv_json(ws))["type"] not in ("accepted", "error"):
                    assert f["type"] == "event"
                if i < 64:
                    assert f["type"] == "accepted", f
            while f["type"] != "error":
                f = await recv_json(ws)
            assert f["code"] == "too_many_followed"  # accepted, not followed (too_many_jobs: not submitted)
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"


async def test_resume_or_cancel_of_someone_elses_job_is_not_found(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        alice = await login(c, "alice")
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers={"Authorization": f"Bearer {alice}"})
        job_id = r.json()["job_id"]
        async with ws_connect(s.ws_url, await login(c, "mallory")) as ws:
            for frame in ({"type": "resume", "job_id": job_id, "id": "r"}, {"type": "cancel", "job_id": job_id, "id": "c"}):
                await ws.send(json.dumps(frame))
                f = await recv_json(ws)
                assert (f["type"], f["code"], f["id"]) == ("error", "not_found", frame["id"])
        async with ws_connect(s.ws_url, alice) as ws:
            await ws.send(json.dumps({"type": "resume", "job_id": job_id, "id": "r"}))
            while (f := await recv_json(ws))["type"] != "result":
                assert f["type"] == "event"
            assert f["status"] == "done"
