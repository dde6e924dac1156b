"""A hostile HTTP client against a real gateway (NATS, the real auth plugin on PostgreSQL and
Redis, the memory plugin): malformed bodies and values, parameters, ids, tokens, methods and
sizes. Every answer is checked for its status, its JSON error shape and that it leaks nothing
internal; no client mistake may be logged at ERROR."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from aiwfe.bus.nats import NatsBus
from tests.support.gateway import (
    GatewaySystem,
    gateway_manifest,
    real_auth_config,
    real_auth_tokens,
    register_and_login,
    run_system,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

PASSWORD = "correct horse battery"
JSON = {"Content-Type": "application/json"}
LEAKS = ("Traceback", 'File "', "DataError", "PostgreSQL", "psycopg", "portal", "JSON path", "asyncpg")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error(r: httpx.Response, status: int, *needles: str) -> str:
    """Assert ``r`` is the gateway's JSON error ``status`` naming each of ``needles``, leaking nothing."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert body["status_code"] == status and isinstance(body["detail"], str), body
    for leak in LEAKS:
        assert leak not in r.text, r.text
    for needle in needles:
        assert needle in r.text, (needle, r.text)
    return str(body["detail"])


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Client mistakes are never logged at ERROR."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [(r.name, r.getMessage()) for r in bad]


@pytest.fixture
def system(prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path) -> Any:
    """Start the gateway pod with the real auth plugin (admin ``root``) and the memory plugin."""

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[tuple[GatewaySystem, httpx.AsyncClient]]:
        auth = real_auth_config(pg_url, redis_url, prefix) + 'admin_users = ["root"]\n'
        text = gateway_manifest(prefix, auth="auth", auth_config=auth).replace('"reasoning"]', '"reasoning", "memory"]')
        text += f'[plugins.memory]\ndatabase_url = "{pg_url}"\ndata_dir = "{tmp_path}"\ncollection = "{prefix}"\n'
        text += 'embedder = "hashing"\n'
        async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s:
            async with httpx.AsyncClient(base_url=s.url, timeout=20) as c:
                yield s, c

    return start


async def done_job(c: httpx.AsyncClient, h: dict[str, str]) -> str:
    """Submit a crunch job and wait for its outcome; its id."""
    r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3}}, headers=h)
    assert r.status_code == 202, r.text
    job_id = str(r.json()["job_id"])
    async with asyncio.timeout(15):
        while (await c.get(f"/v1/jobs/{job_id}", headers=h)).json()["status"] == "pending":
            await asyncio.sleep(0.05)
    return job_id


async def raw(url: str, data: bytes, wait_s: float = 2.0) -> tuple[bytes, bool]:
    """Send ``data`` on a fresh connection; what came back within ``wait_s`` and whether the server closed."""
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(data)
    out, closed = b"", False
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                out += chunk
            closed = True
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    writer.close()
    return out, closed


async def test_bodies_that_are_not_json_objects_are_refused(system: Any) -> None:
    async with system() as (_s, c):
        h = bearer(await register_and_login(c, "alice", PASSWORD))
        job = b'{"kind":"crunch","input":{"n":1}}'
        for ctype in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
            "application/jsonx",
        ):
            error(await c.post("/v1/jobs", content=job, headers={**h, "Content-Type": ctype}), 415, "Content-Type")
        error(await c.post("/v1/jobs", content=job, headers=h), 415)  # a body without a content type
        for ctype in ("application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.x+json"):
            assert (await c.post("/v1/jobs", content=job, headers={**h, "Content-Type": ctype})).status_code == 202, ctype
        for path in ("/v1/jobs", "/v1/auth/login", "/v1/auth/register", "/v1/memory", "/v1/memory/recall", "/v1/console/jobs"):
            for body in (b"[]", b'"x"', b"null", b"1", b"true"):
                error(await c.post(path, content=body, headers={**h, **JSON}), 400, "Expected `object`")
            error(await c.post(path, content=b"", headers={**h, **JSON}), 400)
        for body, needle in [
            (b'{"kind":"crunch","input":{"n":NaN}}', "malformed"),
            (b'{"kind":"crunch","input":{"n":Infinity}}', "malformed"),
            (b'{"kind":"crunch","input":{"n":1e400}}', "out of range"),
            (b'{"kind":"crunch\xff","input":{}}', "UTF-8"),
            (b'\xef\xbb\xbf{"kind":"crunch","input":{}}', "malformed"),
            (b'{"kind":"crunch","input":{}} trailing', "malformed"),
            (b'{"kind":"crunch","input":{"n":' + b"[" * 100_000 + b"]" * 100_000 + b"}}", "nested too deeply"),
            (b'{"kind":"crunch","input":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}", "nested too deeply"),
        ]:
            error(await c.post("/v1/jobs", content=body, headers={**h, **JSON}), 400, needle)
        r = await c.post("/v1/memory/recall", json={"query": "x", "k": 1.5}, headers=h)
        error(r, 400, "k")


async def test_values_the_bus_or_a_database_cannot_hold_are_400_naming_the_field(system: Any) -> None:
    """Before: integers past 64 bits were a 500 (memory) or a job dead-lettered after three
    attempts; NUL characters and an empty memory text a 502 carrying PostgreSQL's error text."""
    async with system() as (_s, c):
        h = bearer(await register_and_login(c, "alice", PASSWORD))
        for n in (2**64, -(2**63) - 1):
            error(await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": n}}, headers=h), 400, "input.n", "2^64")
        # the kernel checks what the contract holds (aiwfe.kernel.submitting): a field it does not
        # declare is ignored by every pod, whatever it holds
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1, "x": [0, {"y": 2**70}]}}, headers=h)
        assert r.status_code == 202, r.text
        assert (
            await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2**63 - 1, "x": 2**64 - 1}}, headers=h)
        ).status_code == 202
        error(await c.post("/v1/memory", json={"text": "t", "metadata": {"k": 2**64}}, headers=h), 400, "metadata.k")
        error(await c.post("/v1/memory/recall", json={"query": "q", "filters": {"k": 2**64}}, headers=h), 400, "filters.k")
        for body, field in [
            ({"text": "a\u0000b"}, "text"),
            ({"text": "ab", "metadata": {"k": ["a\u0000"]}}, "metadata.k[0]"),
            ({"text": "ab", "metadata": {"k\u0000": 1}}, "metadata.k"),
            ({"text": "  "}, "text: must not be empty"),
        ]:
            error(await c.post("/v1/memory", json=body, headers=h), 400, field)
        error(await c.post("/v1/memory/recall", json={"query": "a\u0000"}, headers=h), 400, "query")
        error(await c.post("/v1/memory/recall", json={"query": "a", "filters": {"k": "\u0000"}}, headers=h), 400, "filters.k")
        # a name no user can have (auth's store answers it without asking PostgreSQL): as an unknown name
        error(await c.post("/v1/auth/login", json={"username": "al\u0000ice", "password": PASSWORD}), 401)
        assert (await c.post("/v1/memory", json={"text": "fine", "metadata": {"k": 2**64 - 1}}, headers=h)).status_code == 201
        # Filter keys mean the same to both indexes (before: a ValueError of Qdrant's path, 502):
        # the memory plugin refuses others as BadInput, whoever calls it.
        for key in ("a'; drop", "a.b", "", "k" * 65):
            r = await c.post("/v1/memory/recall", json={"query": "q", "filters": {key: "x"}}, headers=h)
            error(r, 400, "filters: key")


async def test_sse_resume_parameters_are_checked(system: Any) -> None:
    async with system() as (_s, c):
        h = bearer(await register_and_login(c, "alice", PASSWORD))
        job_id = await done_job(c, h)
        url = f"/v1/jobs/{job_id}/events"
        for value in ("-1", "1.5", "abc", "1e3", "+1", "", "99999999999999999999", "\u0663"):
            error(await c.get(url, params={"after_seq": value}, headers=h), 400, "after_seq must be an integer")
        for value in ("-1", "1.5", "abc", "1e3", "+1", "99999999999999999999"):
            error(await c.get(url, headers={**h, "Last-Event-ID": value}), 400, "Last-Event-ID must be an integer")
        # Repeated: which one counts would be a guess (before: one of them was taken silently).
        error(await c.get(f"{url}?after_seq=1&after_seq=2", headers=h), 400, "after_seq given 2 times")
        r = await c.get(url, headers=[*h.items(), ("Last-Event-ID", "1"), ("Last-Event-ID", "2")])
        error(r, 400, "Last-Event-ID given 2 times")
        error(await c.get(url, params={"after_seq": "9"}, headers=h), 400, "past the job's last event")
        assert (await c.get(url, params={"after_seq": "2"}, headers=h)).status_code == 204  # crunch: 2 events
        r = await c.get(url, params={"after_seq": "1"}, headers=h)
        assert r.status_code == 200 and "id: 2" in r.text and "id: 1\r\n" not in r.text


async def test_job_ids_of_others_and_malformed_ids_are_404(system: Any) -> None:
    async with system() as (_s, c):
        alice = bearer(await register_and_login(c, "alice", PASSWORD))
        bob = bearer(await register_and_login(c, "bob", PASSWORD))
        job_id = await done_job(c, alice)
        for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/console/jobs/{job_id}"):
            assert error(await c.get(path, headers=bob), 404) == f"no job {job_id}"
        error(await c.post("/v1/console/jobs", json={"job_id": job_id, "kind": "crunch"}, headers=bob), 404)
        missing = "0" * 32
        assert error(await c.get(f"/v1/jobs/{missing}", headers=bob), 404) == f"no job {missing}"  # the same answer
        for bad in ("a.b", "*", ">", "%00", "a%20b", "%ff", "x" * 3000, "a%2Fb", "..%2F..%2Fetc", "%2e%2e"):
            for path in (f"/v1/jobs/{bad}", f"/v1/jobs/{bad}/events", f"/v1/console/jobs/{bad}"):
                error(await c.get(path, headers=alice), 404)
        assert (await c.get(f"/v1/jobs/{job_id}", headers=alice)).json()["status"] == "done"


async def test_tokens_that_are_not_valid_and_users_cut_off_are_refused(system: Any) -> None:
    async with system() as (_s, c):
        alice = await register_and_login(c, "alice", PASSWORD)
        bob = await register_and_login(c, "bob", PASSWORD)
        root = bearer(await register_and_login(c, "root", PASSWORD))
        tokens = real_auth_tokens()
        headers = [
            {},
            {"Authorization": "Basic YWxpY2U6eA=="},
            {"Authorization": "Bearer"},
            {"Authorization": f"Token {alice}"},
            {"Authorization": f"Bearer {alice}x"},
            {"Authorization": f"Bearer {alice} trailing"},
            {"Authorization": f"Bearer {alice[:-4]}{'AAAA' if alice[-4:] != 'AAAA' else 'BBBB'}"},
            {"Authorization": f"Bearer {alice}."},
            *({"Authorization": f"Bearer {tokens[k]}"} for k in ("expired", "forged", "alg_none", "wrong_audience", "garbage")),
        ]
        for hdrs in headers:
            for method, path in [("GET", "/v1/console/jobs"), ("POST", "/v1/memory"), ("GET", "/v1/admin/dead-letters")]:
                r = await c.request(method, path, headers=hdrs, json={"text": "x"})
                error(r, 401)
                assert r.headers["www-authenticate"] == "Bearer"
        # Admin routes as a non-admin: 403, also for a name no user can have.
        for method, path in [
            ("POST", "/v1/admin/users/bob/disable"),
            ("POST", "/v1/admin/users/bob/enable"),
            ("DELETE", "/v1/admin/users/bob"),
            ("POST", "/v1/admin/users/%00/disable"),
            ("GET", "/v1/admin/dead-letters"),
            ("POST", f"/v1/admin/dead-letters/{'a' * 32}/replay"),
        ]:
            error(await c.request(method, path, headers=bearer(alice)), 403, "admin only")
        # As an admin, a name with NUL is no user (before: 502 with PostgreSQL's error text).
        for method, path in [("POST", "/v1/admin/users/%00/disable"), ("DELETE", "/v1/admin/users/a%00b")]:
            error(await c.request(method, path, headers=root), 404, "UnknownUser")
        error(await c.get("/v1/admin/dead-letters?kind=a.b&kind=c.d", headers=root), 400, "kind given 2 times")
        # Login answers do not tell an unknown name from a wrong password or a disabled user.
        assert (await c.post("/v1/admin/users/bob/disable", headers=root)).status_code == 200
        answers = set()
        for name, password in [("nobody_here", PASSWORD), ("alice", PASSWORD + "x"), ("bob", PASSWORD)]:
            r = await c.post("/v1/auth/login", json={"username": name, "password": password})
            answers.add((r.status_code, r.text, r.headers.get("www-authenticate")))
        assert len(answers) == 1 and next(iter(answers))[0] == 401, answers
        # A disabled user's token, and a deleted one's, stop working.
        error(await c.get("/v1/console/jobs", headers=bearer(bob)), 401, "revoked")
        assert (await c.delete("/v1/admin/users/alice", headers=root)).status_code == 200
        for method, path in [("GET", "/v1/console/jobs"), ("GET", "/v1/console/me"), ("POST", "/v1/memory/recall")]:
            error(await c.request(method, path, headers=bearer(alice), json={"query": "x"}), 401, "revoked")


async def test_methods_head_and_options(system: Any) -> None:
    async with system() as (_s, c):
        h = bearer(await register_and_login(c, "alice", PASSWORD))
        job_id = await done_job(c, h)
        routes = {
            "/v1/auth/login": {"POST"},
            "/v1/jobs": {"POST"},
            f"/v1/jobs/{job_id}": {"GET"},
            f"/v1/jobs/{job_id}/events": {"GET"},
            "/v1/memory": {"POST"},
            "/v1/pods": {"GET"},
            "/health": {"GET"},
            "/ready": {"GET"},
            "/metrics": {"GET"},
            "/": {"GET"},
            "/v1/console/jobs": {"GET", "POST"},
            "/v1/admin/dead-letters": {"GET"},
            "/v1/admin/users/bob": {"DELETE"},
        }
        for path, allowed in routes.items():
            allow = {*allowed, "OPTIONS"}
            for method in {"GET", "POST", "PUT", "PATCH", "DELETE", "TRACE"} - allowed:
                r = await c.request(method, path, headers=h)
                error(r, 405)
                assert {m.strip() for m in r.headers["allow"].split(",")} >= allow, (path, r.headers["allow"])
            # OPTIONS lists every method of the path (before: /v1/console/jobs said GET only).
            r = await c.options(path, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
            assert r.status_code == 204 and r.content == b"", (path, r.status_code)
            assert {m.strip() for m in r.headers["allow"].split(",")} == allow, (path, r.headers["allow"])
            assert "access-control-allow-origin" not in r.headers  # no CORS: a foreign page may not call
            if "GET" in allowed:  # HEAD: GET's status and headers, no body (before: 405)
                get_r, head_r = await c.get(path, headers=h), await c.head(path, headers=h)
                assert head_r.status_code == get_r.status_code != 405 and head_r.content == b"", path
                assert head_r.headers["content-type"] == get_r.headers["content-type"], path
        error(await c.options("/v1/nope"), 404)
        assert (await c.head("/v1/nope")).status_code == 404
        # HEAD of a running job's stream answers its head at once instead of following the job.
        r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2, "delay_s": 30}}, headers=h)
        async with asyncio.timeout(5):
            r = await c.head(f"/v1/jobs/{r.json()['job_id']}/events", headers=h)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")


async def test_bodies_over_the_limit_are_413_before_they_are_read(system: Any) -> None:
    async with system() as (s, c):
        token = await register_and_login(c, "alice", PASSWORD)
        host = urlsplit(s.url).netloc
        limit = int(s.gateway.config.max_body_bytes)
        head = f"Host: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        # Declared too large: answered before the body is sent (nothing of it is waited for).
        for path in ("/v1/jobs", "/v1/auth/login", "/v1/memory"):
            out, _ = await raw(s.url, f"POST {path} HTTP/1.1\r\n{head}Content-Length: {limit + 1}\r\n\r\n{{".encode(), 2.0)
            assert out.startswith(b"HTTP/1.1 413"), out[:300]
            assert f'"detail":"the body is larger than {limit} bytes"'.encode() in out, out[:300]
        # The rest of that body, once sent, is discarded, never taken for a request of its own:
        # the next request on the connection is answered as itself.
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        body = (b"{" + health * (limit // len(health)))[: limit + 1]
        body += b" " * (limit + 1 - len(body))
        out, _ = await raw(s.url, f"POST /v1/jobs HTTP/1.1\r\n{head}Content-Length: {limit + 1}\r\n\r\n".encode() + body + health)
        assert out.startswith(b"HTTP/1.1 413") and out.count(b"HTTP/1.1 200") == 1 and out.count(b'{"status":"ok"}') == 1, out[
            -300:
        ]
        # Chunked, no Content-Length, growing past the limit: 413.
        chunk = b"%x\r\n%s\r\n" % (65536, b"a" * 65536)
        chunked = b'9\r\n{"kind":"\r\n' + chunk * (limit // 65536 + 2)
        out, _ = await raw(s.url, f"POST /v1/jobs HTTP/1.1\r\n{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked)
        assert out.startswith(b"HTTP/1.1 413") and b'"status_code":413' in out, out[:300]
        # A client that keeps sending a too-large body still reads its 413.
        r = await c.post("/v1/jobs", content=b'{"kind":"' + b"a" * (2 * limit) + b'"}', headers={**bearer(token), **JSON})
        error(r, 413)
        # Content-Length shorter than the body: the rest is not a request of its own.
        smuggled = b"xGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        out, _ = await raw(s.url, f"POST /v1/jobs HTTP/1.1\r\n{head}Content-Length: 2\r\n\r\n{{}}".encode() + smuggled)
        assert out.startswith(b"HTTP/1.1 400") and b'"status":"ok"' not in out, out[:400]
        # Just under the limit is read and validated as usual.
        r = await c.post("/v1/jobs", content=b'{"kind":"' + b"a" * (limit - 100) + b'"}', headers={**bearer(token), **JSON})
        error(r, 400, "unknown job kind")


async def test_x_forwarded_for_does_not_choose_the_client_address(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The login throttle counts attempts per client address, the TCP peer (README: the header
    is not trusted). uvicorn trusts ``X-Forwarded-For`` by default from loopback (and from the
    addresses ``FORWARDED_ALLOW_IPS`` names): a client there sent a new address with each
    guess and was never locked (10 of 10 wrong logins answered 401 with a limit of 2)."""
    auth = real_auth_config(pg_url, redis_url, prefix) + "login_addr_attempts = 2\n"
    text = gateway_manifest(prefix, auth="auth", auth_config=auth)
    async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        statuses = []
        for i in range(6):
            body = {"username": f"nobody{i}", "password": "not the password"}
            r = await c.post("/v1/auth/login", json=body, headers={"X-Forwarded-For": f"198.51.100.{i}"})
            statuses.append(r.status_code)
        assert statuses[:2] == [401, 401] and set(statuses[2:]) == {429}, statuses
