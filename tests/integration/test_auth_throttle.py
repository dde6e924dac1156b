"""Login throttling and admin user operations (issue 13, item 2) against real PostgreSQL, Redis
and (for the NATS runs) NATS: per-username and per-address locks with backoff, shared through
Redis and held in memory when Redis is down, the same answers for users that do not exist;
disabling and deleting users cuts off their tokens on every pod; the gateway's 429, 403, 404
and the 4001 close of a disabled user's sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.errors import Forbidden, Overloaded, RemoteError
from aiwfe.kernel.tools.embedded_db import EmbeddedValkey
from aiwfe.plugins.auth.contract import DeleteUser, DisableUser, Login, Register, Verify
from aiwfe.plugins.auth.errors import TooManyAttempts
from tests.conftest import wait_until
from tests.support.auth import PASSWORD, StartAuth, auth_config, expect_invalid, plugin_of
from tests.support.gateway import gateway_manifest, real_auth_config, recv_json, run_system, ws_connect

pytestmark = pytest.mark.integration

WRONG = "wrong password!"


async def _fails(k: object, username: str, n: int, client: str = "") -> list[str]:
    """``n`` logins with a wrong password; the error type and message of each."""
    out = []
    for _ in range(n):
        with pytest.raises(RemoteError) as e:
            await k.call(Login(username=username, password=WRONG, client=client))  # type: ignore[attr-defined]
        out.append(f"{e.value.type}: {e.value.message}")
    return out


async def _throttled(call: object) -> float:
    with pytest.raises(RemoteError) as e:
        await call  # type: ignore[misc]
    assert e.value.type == "TooManyAttempts", e.value
    assert e.value.retry_after_s is not None and e.value.retry_after_s >= 1
    return e.value.retry_after_s


async def test_username_locks_after_its_allowance_same_for_unknown_users(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    cfg = auth_config(pg_url, redis_url, prefix, login_user_attempts=3, login_backoff_s=60.0, login_addr_attempts=1000)
    async with start_auth(cfg, auth_pods=2) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="tina", password=PASSWORD))
        known = await _fails(k, "tina", 3)
        unknown = await _fails(k, "ghost", 3)
        assert known == unknown == ["InvalidCredentials: wrong username or password"] * 3
        # locked: even the right password is refused, before any hashing; unknown users alike
        hint = await _throttled(k.call(Login(username="TINA", password=PASSWORD)))
        assert 1 <= hint <= 60
        await _throttled(k.call(Login(username="ghost", password=PASSWORD)))
        for name in ("tina", "ghost"):
            with pytest.raises(RemoteError) as e:
                await k.call(Login(username=name, password=WRONG))
            assert (e.value.type, e.value.message) == ("TooManyAttempts", "too many failed logins; retry later")
        # the lock is in Redis, shared by both auth pods, and in each pod's memory that saw failures
        r = aioredis.Redis.from_url(redis_url)
        digest = hashlib.sha256(b"tina").hexdigest()
        assert 0 < await r.pttl(f"{prefix}:throttle:user:{digest}:lock") <= 60_000
        await r.aclose()
        for name in ("auth", "auth2"):
            throttle = plugin_of(pods[name]).throttle
            assert throttle is not None
            with pytest.raises(TooManyAttempts):
                await throttle.admit("tina", "")
        # other users are not affected
        await k.call(Register(username="ursula", password=PASSWORD))
        assert (await k.call(Login(username="ursula", password=PASSWORD))).access_token


async def test_a_parallel_burst_gets_no_more_than_the_allowance(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    """Attempts are counted as they are admitted (one atomic Redis script), not when their hash
    finishes: once a name has failed, 20 guesses at once get no more password checks than the
    allowance, whichever auth pod takes them; then a clean name's burst of correct logins is served."""
    cfg = auth_config(pg_url, redis_url, prefix, login_user_attempts=3, login_backoff_s=60.0)
    async with start_auth(cfg, auth_pods=2) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="yolanda", password=PASSWORD))

        async def guess() -> str:
            try:
                await k.call(Login(username="yolanda", password=WRONG))
            except RemoteError as e:
                return e.type
            return "ok"

        assert await guess() == "InvalidCredentials"  # the name is now dirty: admission is strict
        results = await asyncio.gather(*(guess() for _ in range(20)))
        assert sorted(results) == ["InvalidCredentials"] * 2 + ["TooManyAttempts"] * 18, results
        await k.call(Register(username="zelda", password=PASSWORD))
        tokens = await asyncio.gather(*(k.call(Login(username="zelda", password=PASSWORD)) for _ in range(20)))
        assert len({t.access_token for t in tokens}) == 20


async def test_success_clears_the_username_count_and_backoff_doubles(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    cfg = auth_config(pg_url, redis_url, prefix, login_user_attempts=3, login_backoff_s=10.0, login_max_backoff_s=35.0)
    async with start_auth(cfg) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="vera", password=PASSWORD))
        await _fails(k, "vera", 2)
        await k.call(Login(username="vera", password=PASSWORD))  # clears the count
        await _fails(k, "vera", 2)
        await k.call(Login(username="vera", password=PASSWORD))  # still below the allowance
        throttle = plugin_of(pods["auth"]).throttle
        assert throttle is not None
        assert [throttle.delay_s("user", n) for n in (2, 3, 4, 5, 6)] == [0.0, 10.0, 20.0, 35.0, 35.0]


async def test_client_address_locks_across_usernames(start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str) -> None:
    cfg = auth_config(pg_url, redis_url, prefix, login_user_attempts=100, login_addr_attempts=4, login_backoff_s=60.0)
    async with start_auth(cfg) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="walt", password=PASSWORD))
        for name in ("a1x", "b2y", "c3z", "d4w"):
            await _fails(k, name, 1, client="203.0.113.9")
        await _throttled(k.call(Login(username="walt", password=PASSWORD, client="203.0.113.9")))
        # another address, or none, logs in
        assert (await k.call(Login(username="walt", password=PASSWORD, client="198.51.100.1"))).access_token
        assert (await k.call(Login(username="walt", password=PASSWORD))).access_token


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_throttling_holds_with_redis_down(start_auth: StartAuth, pg_url: str, prefix: str, tmp_path: Path) -> None:
    vk = EmbeddedValkey(tmp_path / "valkey").start()
    try:
        cfg = auth_config(pg_url, vk.url, prefix, login_user_attempts=2, login_backoff_s=60.0)
        async with start_auth(cfg) as pods:
            k = pods["client"].kernel
            await k.call(Register(username="xena", password=PASSWORD))
            vk.kill()
            await _fails(k, "xena", 2)
            await _throttled(k.call(Login(username="xena", password=PASSWORD)))
            assert plugin_of(pods["auth"]).degraded()
    finally:
        vk.stop()


async def test_admin_disables_enables_and_deletes_users(start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str) -> None:
    cfg = auth_config(pg_url, redis_url, prefix, admin_users=["Root"])
    async with start_auth(cfg, auth_pods=2) as pods:
        k = pods["client"].kernel
        for name in ("root", "bob", "dave"):
            await k.call(Register(username=name, password=PASSWORD))
        root = (await k.call(Login(username="root", password=PASSWORD))).access_token
        bob = (await k.call(Login(username="bob", password=PASSWORD))).access_token
        dave = (await k.call(Login(username="dave", password=PASSWORD))).access_token
        bob_claims = await k.call(Verify(token=bob))

        with pytest.raises(Forbidden):
            await k.call(DisableUser(token=bob, username="dave"))
        await expect_invalid(k.call(DisableUser(token=root, username="nobody")), "UnknownUser", "no user")

        out = await k.call(DisableUser(token=root, username="BOB"))
        assert (out.user_id, out.username, out.disabled) == (bob_claims.sub, "bob", True)
        # every auth pod refuses bob's token (cached claims or not), from memory
        for name in ("auth", "auth2"):
            assert await wait_until(
                lambda n=name: plugin_of(pods[n]).subjects.denies(bob_claims.sub, bob_claims.iat), timeout_s=5
            )
            await expect_invalid(pods[name].kernel.call(Verify(token=bob)), "InvalidToken", "revoked")
        # a disabled user's login reads like a wrong password
        await expect_invalid(k.call(Login(username="bob", password=PASSWORD)), "InvalidCredentials", "wrong username or password")
        # the cut-off is in Redis for pods that start later
        cutoffs = await plugin_of(pods["auth"]).cache.revoked_subjects()  # type: ignore[union-attr]
        assert cutoffs is not None and bob_claims.sub in cutoffs

        await k.call(DisableUser(token=root, username="bob", disabled=False))
        bob2 = (await k.call(Login(username="bob", password=PASSWORD))).access_token  # may be the same second
        assert (await k.call(Verify(token=bob2))).sub == bob_claims.sub
        await expect_invalid(k.call(Verify(token=bob)), "InvalidToken", "revoked")  # the old one stays revoked

        out = await k.call(DeleteUser(token=root, username="dave"))
        assert out.deleted and out.username == "dave"
        # every auth pod holds the cut-off once the event reached it (verify never asks Redis)
        for name in ("auth", "auth2"):
            assert await wait_until(lambda n=name: plugin_of(pods[n]).subjects.before(out.user_id) is not None, timeout_s=5)
        await expect_invalid(k.call(Verify(token=dave)), "InvalidToken", "revoked")
        await expect_invalid(k.call(Login(username="dave", password=PASSWORD)), "InvalidCredentials", "wrong")
        await expect_invalid(k.call(DeleteUser(token=root, username="dave")), "UnknownUser", "no user")
        # the name is free again; the new dave is another subject
        await k.call(Register(username="dave", password=PASSWORD))
        dave2 = (await k.call(Login(username="dave", password=PASSWORD))).access_token
        assert (await k.call(Verify(token=dave2))).username == "dave"


@pytest.mark.usefixtures("cleanup_streams")
async def test_gateway_429_admin_routes_and_socket_close(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> None:
    auth_cfg = (
        real_auth_config(pg_url, redis_url, prefix) + 'login_user_attempts = 2\nlogin_backoff_s = 60.0\nadmin_users = ["root"]\n'
    )
    text = gateway_manifest(prefix, auth="auth", auth_config=auth_cfg)
    async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s, httpx.AsyncClient(base_url=s.url) as c:
        tokens = {}
        for name in ("root", "bob", "zoe"):
            assert (await c.post("/v1/auth/register", json={"username": name, "password": PASSWORD})).status_code == 201
            r = await c.post("/v1/auth/login", json={"username": name, "password": PASSWORD})
            tokens[name] = r.json()["access_token"]
        # throttling: 401, 401, then 429 with Retry-After, identical for an unknown user
        for name in ("zoe", "nobody-here"):
            codes = [(await c.post("/v1/auth/login", json={"username": name, "password": WRONG})).status_code for _ in range(2)]
            r = await c.post("/v1/auth/login", json={"username": name, "password": PASSWORD})
            assert codes == [401, 401] and r.status_code == 429, r.text
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            assert r.json()["detail"] == "TooManyAttempts: too many failed logins; retry later"

        h = {"Authorization": f"Bearer {tokens['bob']}"}
        assert (await c.post("/v1/admin/users/zoe/disable", headers=h)).status_code == 403
        root = {"Authorization": f"Bearer {tokens['root']}"}
        assert (await c.post("/v1/admin/users/nobody/disable", headers=root)).status_code == 404
        async with ws_connect(s.ws_url, tokens["bob"]) as ws:
            await ws.send(json.dumps({"type": "ping"}))
            assert (await recv_json(ws))["type"] == "pong"
            r = await c.post("/v1/admin/users/bob/disable", headers=root)
            assert r.status_code == 200 and r.json()["disabled"] is True
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await recv_json(ws)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        assert (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1}}, headers=h)).status_code == 401
        assert (await c.post("/v1/admin/users/bob/enable", headers=root)).json()["disabled"] is False
        r = await c.request("DELETE", "/v1/admin/users/bob", headers=root)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert (await c.post("/v1/auth/login", json={"username": "bob", "password": PASSWORD})).status_code == 401


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_unknown_disabled_and_wrong_password_logins_cost_the_same_work(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    """No timing oracle, shown without timing: each failed login runs exactly one argon2 check
    (a dummy hash for a user that does not exist) and gets the same answer."""
    async with start_auth(auth_config(pg_url, redis_url, prefix, admin_users=["root"])) as pods:
        k = pods["client"].kernel
        plugin = plugin_of(pods["auth"])
        for name in ("root", "yuri", "yves"):
            await k.call(Register(username=name, password=PASSWORD))
        root = (await k.call(Login(username="root", password=PASSWORD))).access_token
        await k.call(DisableUser(token=root, username="yves"))
        hashes = 0
        real = plugin._run_kdf

        async def counting(fn: object, *args: object) -> object:
            nonlocal hashes
            hashes += 1
            return await real(fn, *args)

        plugin._run_kdf = counting  # type: ignore[method-assign]
        answers = []
        for name, password in (("yuri", WRONG), ("nobody", WRONG), ("nobody", PASSWORD), ("yves", PASSWORD)):
            before = hashes
            answers += await _fails_with(k, name, password)
            assert hashes == before + 1, name
        assert answers == ["InvalidCredentials: wrong username or password"] * 4


async def _fails_with(k: object, username: str, password: str) -> list[str]:
    with pytest.raises(RemoteError) as e:
        await k.call(Login(username=username, password=password))  # type: ignore[attr-defined]
    return [f"{e.value.type}: {e.value.message}"]


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_a_pod_that_missed_the_event_catches_up_from_redis(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    """The cut-off is written to Redis only (as if the SubjectRevoked event never reached the
    pods): every pod refuses the user's token within ``subject_refresh_s``."""
    async with start_auth(auth_config(pg_url, redis_url, prefix, subject_refresh_s=0.2), auth_pods=2) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="quinn", password=PASSWORD))
        token = (await k.call(Login(username="quinn", password=PASSWORD))).access_token
        claims = await k.call(Verify(token=token))
        cache = plugin_of(pods["auth"]).cache
        assert cache is not None and await cache.revoke_subject(claims.sub, claims.iat, 3600)
        for name in ("auth", "auth2"):
            subjects = plugin_of(pods[name]).subjects
            assert await wait_until(lambda s=subjects: s.denies(claims.sub, claims.iat), timeout_s=10)
            await expect_invalid(pods[name].kernel.call(Verify(token=token)), "InvalidToken", "revoked")
        # expired cut-offs are dropped from the hash when read
        r = aioredis.Redis.from_url(redis_url)
        await r.hset(f"{prefix}:subjects", "long-gone", "100:200")
        cutoffs = await cache.revoked_subjects()
        assert cutoffs is not None and claims.sub in cutoffs and "long-gone" not in cutoffs
        assert not await r.hexists(f"{prefix}:subjects", "long-gone")
        await r.aclose()


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_a_login_refused_for_saturated_hashing_costs_no_throttle_call_nor_an_attempt(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    """A burst's refused logins are mostly retries: each is refused (Overloaded, retryable, with a
    hint) before the throttle's Redis scripts run, and counts as no attempt."""
    cfg = auth_config(pg_url, redis_url, prefix, login_user_attempts=2, login_backoff_s=60.0, login_addr_attempts=1000)
    async with start_auth(cfg) as pods:
        k = pods["client"].kernel
        plugin = plugin_of(pods["auth"])
        await k.call(Register(username="sam", password=PASSWORD))
        calls = 0
        admit = plugin.throttle.admit

        async def counting(*args: object) -> None:
            nonlocal calls
            calls += 1
            await admit(*args)

        plugin.throttle.admit = counting
        gate = plugin._gate
        saved = gate.pending, gate.avg_s
        gate.pending, gate.avg_s = 1000, 1.0  # a thousand hashes of a second each are queued
        for _ in range(5):  # more than the username's allowance of 2
            with pytest.raises(Overloaded) as e:
                await k.call(Login(username="sam", password=WRONG))
            assert e.value.retryable and e.value.retry_after_s is not None and e.value.retry_after_s >= 1
        assert calls == 0
        gate.pending, gate.avg_s = saved
        assert await _fails(k, "sam", 1) == ["InvalidCredentials: wrong username or password"]  # attempt 1 of 2
        assert (await k.call(Login(username="sam", password=PASSWORD))).access_token  # not locked out
        assert calls == 2
