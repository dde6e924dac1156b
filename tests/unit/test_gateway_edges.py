"""Protocol edges of the gateway (issue 13, item 7) on LocalBus with the test auth double:
oversized handshake headers (431 at once), deeply nested frames (``bad_frame``, the socket
stays), range-checked sequences on WebSocket and SSE, JSON routes refusing other content types."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import httpx
import pytest

from aiwfe.plugins.gateway.limits import MAX_SEQ, parse_seq, too_deep
from tests.support.gateway import recv_json, ws_connect
from tests.unit.test_gateway_http import StartGateway, bearer, login
from tests.unit.test_gateway_http import gateway as gateway  # the fixture


async def _raw_request(url: str, request: bytes) -> bytes:
    """Send ``request`` on a fresh TCP connection; return the start of the answer (the test fails
    with TimeoutError if the server never answers: the bug this guards against)."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read(200)
    finally:
        writer.close()


def _handshake(token: str, cookie_bytes: int) -> bytes:
    return (
        "GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\nCookie: c={'x' * cookie_bytes}\r\n\r\n"
    ).encode()


def test_too_deep_and_parse_seq() -> None:
    assert not too_deep(b'{"a": [1, 2, {"b": 3}]}', 3)
    assert too_deep(b'{"a": [1, 2, {"b": [3]}]}', 3)
    assert not too_deep('{"s": "[[[[[[[[[[[[[[[["}', 2)  # brackets inside strings do not count
    assert not too_deep('{"s": "\\"[[[[[[[[[[[["}', 2)  # nor after an escaped quote
    assert not too_deep("[]" * 1000, 1)  # many, but flat
    assert parse_seq("12", "x") == 12 and parse_seq(MAX_SEQ, "x") == MAX_SEQ
    for bad in (-1, MAX_SEQ + 1, "-1", "1e3", "", "9" * 40, True, 1.5):
        with pytest.raises(ValueError, match="x must be an integer"):
            parse_seq(bad, "x")


async def test_handshake_with_oversized_headers_is_refused_at_once(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        # a small cookie next to a valid token: the handshake succeeds
        assert (await _raw_request(s.url, _handshake(token, 100))).startswith(b"HTTP/1.1 101")
        # one header line past websockets' 8 KiB line limit, and past the total limit (16 KiB)
        for size in (9_000, 20_000, 200_000):
            assert (await _raw_request(s.url, _handshake(token, size))).startswith(b"HTTP/1.1 431"), size
        # plain HTTP with oversized headers: 431 as well
        r = await c.get("/health", headers={"Cookie": "c=" + "x" * 20_000})
        assert r.status_code == 431
        assert (await c.get("/health", headers={"Cookie": "c=" + "x" * 1_000})).status_code == 200


async def test_handshake_with_oversized_headers_under_granian(gateway: StartGateway) -> None:
    """Granian has no limit of its own here: the gateway's ASGI guard answers 431 (a denial response)."""
    async with gateway('server = "granian"') as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        for size in (20_000, 200_000):
            assert (await _raw_request(s.url, _handshake(token, size))).startswith(b"HTTP/1.1 431"), size
        assert (await c.get("/health", headers={"Cookie": "c=" + "x" * 20_000})).status_code == 431


async def test_handshake_header_limit_is_configurable(gateway: StartGateway) -> None:
    async with gateway("max_header_bytes = 2048") as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        assert (await _raw_request(s.url, _handshake(token, 3_000))).startswith(b"HTTP/1.1 431")
        assert (await c.get("/health", headers={"X-Pad": "x" * 3_000})).status_code == 431


async def test_deeply_nested_frame_is_bad_frame_and_the_socket_stays(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            for depth in (33, 5_000):  # just past the default limit (32), and far past it
                deep = "[" * depth + "]" * depth
                await ws.send(
                    json.dumps({"type": "call", "contract": "perception.perceive", "input": {"x": "@"}}).replace('"@"', deep)
                )
                err = await recv_json(ws)
                assert err["type"] == "error" and err["code"] == "bad_frame" and "nested" in err["message"], err
            await ws.send(json.dumps({"type": "ping", "id": "p"}))
            assert await recv_json(ws) == {"type": "pong", "id": "p"}


@pytest.mark.parametrize("after_seq", [-1, MAX_SEQ + 1, 2**64, 1e30, "7", None])
async def test_resume_with_out_of_range_sequence_is_an_error_frame(gateway: StartGateway, after_seq: object) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            await ws.send(json.dumps({"type": "resume", "job_id": "j-1", "after_seq": after_seq, "id": "r"}))
            err = await recv_json(ws)
            assert err["type"] == "error" and err["code"] == "bad_frame" and "after_seq" in err["message"], err
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"


async def test_sse_sequence_range_checked(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3}}, headers=h)
        assert r.status_code == 202, r.text
        events = f"/v1/jobs/{r.json()['job_id']}/events"
        for q in ("-1", str(MAX_SEQ + 1), str(2**70), "x"):
            r = await c.get(events, params={"after_seq": q}, headers=h, timeout=10)
            assert r.status_code == 400, (q, r.text)
        for last in ("-5", str(2**64), "abc", "1.5"):
            r = await c.get(events, headers={**h, "Last-Event-ID": last})
            assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"], (last, r.text)
        r = await c.get(events, params={"after_seq": "0"}, headers=h, timeout=20)
        assert r.status_code == 200 and "job.done" in r.text


async def test_json_routes_require_application_json(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        body = json.dumps({"username": "carol", "password": "correct horse battery"})
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"Content-Type": ctype} if ctype else {}
            r = await c.post("/v1/auth/register", content=body, headers=headers)
            assert r.status_code == 415, (ctype, r.text)
            r = await c.post("/v1/auth/login", content=body, headers=headers)
            assert r.status_code == 415, (ctype, r.text)
        r = await c.post("/v1/auth/register", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 201, r.text
        token = await login(c, "carol")
        # a POST without a body needs no content type
        assert (await c.post("/v1/auth/logout", headers=bearer(token))).status_code == 200


async def test_numeric_fields_of_calls_and_bodies_are_range_checked(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as ws:
            for bad in (-1, 101, 2**62, 2**70, "5", 1.5):
                frame = {"type": "call", "contract": "perception.perceive", "input": {"text": "hi", "max_tags": bad}, "id": "c"}
                await ws.send(json.dumps(frame))
                err = await recv_json(ws)
                assert err["type"] == "error" and err["code"] == "bad_frame" and "max_tags" in err["message"], (bad, err)
            frame = {"type": "call", "contract": "perception.perceive", "input": {"text": "hi", "max_tags": 3}, "id": "ok"}
            await ws.send(json.dumps(frame))
            assert (await recv_json(ws))["type"] == "reply"
        for k in (0, -3, 101, 10**30):
            r = await c.post("/v1/memory/recall", json={"query": "x", "k": k}, headers=bearer(token))
            assert r.status_code == 400 and "k" in r.text, (k, r.text)


async def test_resume_past_the_end_of_a_finished_job_is_an_error(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2}}, headers=h)
        job_id = r.json()["job_id"]
        r = await c.get(f"/v1/jobs/{job_id}/events", headers=h, timeout=20)
        last = max(int(line[3:]) for line in r.text.splitlines() if line.startswith("id:"))
        r = await c.get(f"/v1/jobs/{job_id}/events", params={"after_seq": last + 1000}, headers=h, timeout=20)
        assert r.status_code == 400 and "past the job's last event" in r.text, r.text
        # at the end exactly (an EventSource reconnecting after the end): 204, which stops it
        r = await c.get(f"/v1/jobs/{job_id}/events", headers={**h, "Last-Event-ID": str(last)}, timeout=20)
        assert r.status_code == 204
        async with ws_connect(s.ws_url, h["Authorization"].split()[1]) as ws:
            await ws.send(json.dumps({"type": "resume", "job_id": job_id, "after_seq": last + 5, "id": "r"}))
            err = await recv_json(ws)
            assert err["code"] == "bad_frame" and "past the job's last event" in err["message"], err
            for after in (last, last - 1):  # at the end: the result again, not an endless wait
                await ws.send(json.dumps({"type": "resume", "job_id": job_id, "after_seq": after, "id": "r2"}))
                f = await recv_json(ws)
                assert f["type"] == "result" and f["seq"] == last, f


async def test_resume_past_the_last_event_of_a_running_job_is_an_error(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = bearer(await login(c))
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3, "delay_s": 3.0}}, headers=h)
        job_id = r.json()["job_id"]
        async with ws_connect(s.ws_url, h["Authorization"].split()[1]) as ws:
            # sequences are the stream's: a number past this job's events would skip its next ones
            await ws.send(json.dumps({"type": "resume", "job_id": job_id, "after_seq": 2**40, "id": "r"}))
            err = await recv_json(ws)
            assert err["code"] == "bad_frame" and "past the job's last event" in err["message"], err
            r = await c.get(f"/v1/jobs/{job_id}/events", params={"after_seq": 2**40}, headers=h, timeout=20)
            assert r.status_code == 400 and "past the job's last event" in r.text, r.text
            assert (await c.get(f"/v1/jobs/{job_id}", headers=h)).json()["status"] == "pending"  # still running
            # a resume from 0 of the running job follows it to its result
            await ws.send(json.dumps({"type": "resume", "job_id": job_id, "after_seq": 0, "id": "r0"}))
            while (f := await recv_json(ws, timeout_s=20))["type"] != "result":
                assert f["type"] == "event", f
            assert f["result"]["square"] == 9, f


def test_limit_settings_are_checked() -> None:
    from aiwfe.plugins.gateway.config import GatewayConfig
    from aiwfe.plugins.gateway.plugin import GatewayPlugin

    problems = GatewayPlugin.validate_config(GatewayConfig(max_header_bytes=100, max_frame_depth=0))
    assert "max_header_bytes: must be at least 1024" in problems and "max_frame_depth: must be at least 1" in problems
    assert GatewayPlugin.validate_config(GatewayConfig()) == []


async def test_deeply_nested_json_body_is_400(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        h = {**bearer(await login(c)), "Content-Type": "application/json"}
        deep = "[" * 50_000 + "]" * 50_000
        for path, body in (
            ("/v1/auth/login", '{"username": "a", "password": ' + deep + "}"),
            ("/v1/jobs", '{"kind": "crunch", "input": {"x": ' + deep + "}}"),
        ):
            r = await c.post(path, content=body, headers=h)
            assert r.status_code == 400 and "nested too deeply" in r.text, (path, r.status_code, r.text[:200])
        assert (await c.get("/health")).status_code == 200


async def test_one_user_holds_at_most_max_sockets_per_user(gateway: StartGateway) -> None:
    async with gateway("max_sockets_per_user = 2") as s, httpx.AsyncClient(base_url=s.url) as c:
        alice, bob = await login(c), await login(c, "bob")
        async with ws_connect(s.ws_url, alice), ws_connect(s.ws_url, alice) as second:
            answer = await _raw_request(s.url, _handshake(alice, 10))
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 429") and b"retry-after: " in head.lower(), answer
            assert b"at most 2 WebSockets per user" in body
            async with ws_connect(s.ws_url, bob) as other:  # another user is not affected
                await other.send(json.dumps({"type": "ping", "id": "b"}))
                assert await recv_json(other) == {"type": "pong", "id": "b"}
            await second.close()
            hub = s.gateway.handles.hub
            for _ in range(100):  # its slot is given back once its handler ends (bob's went already)
                if sum(hub.per_sub.values()) < 2:
                    break
                await asyncio.sleep(0.02)
            async with ws_connect(s.ws_url, alice) as third:
                await third.send(json.dumps({"type": "ping", "id": "a"}))
                assert await recv_json(third) == {"type": "pong", "id": "a"}
