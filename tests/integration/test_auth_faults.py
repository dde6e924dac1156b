"""The auth plugin under faults and load: Redis down, the pool exhausted, login bursts past the
hashing capacity, PostgreSQL restarted (its own embedded servers, never the shared ones)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import metrics
from aiwfe.kernel.errors import Overloaded, Unavailable
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres, EmbeddedValkey
from aiwfe.plugins.auth.contract import Login, Logout, Register, TokenRevoked, Verify
from tests.conftest import wait_until
from tests.support.auth import PASSWORD, StartAuth, auth_config, expect_invalid, plugin_of
from tests.support.pods import dump_toml

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_redis_down_tokens_still_verify_and_revocations_hold(
    start_auth: StartAuth, pg_url: str, prefix: str, tmp_path: Path
) -> None:
    vk = EmbeddedValkey(tmp_path / "valkey").start()
    try:
        async with start_auth(auth_config(pg_url, vk.url, prefix), auth_pods=2) as pods:
            a1, a2 = pods["auth"], pods["auth2"]
            await a1.kernel.call(Register(username="erin", password=PASSWORD))
            tokens = [(await a1.kernel.call(Login(username="erin", password=PASSWORD))).access_token for _ in range(3)]
            for t in tokens:
                await a1.kernel.call(Verify(token=t))
            assert plugin_of(a1).degraded() == []

            vk.kill()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for _ in range(50):
                for t in tokens:
                    assert (await a2.kernel.call(Verify(token=t))).username == "erin"
            elapsed_s = loop.time() - t0
            # 150 verifications with Redis dead: a verify never waits for Redis
            assert elapsed_s < 1.5, elapsed_s
            # a logout tries Redis: the breaker opens; the pod reports itself degraded and stays ready
            jti = (await a2.kernel.call(Logout(token=tokens[2]))).jti
            assert any("redis unavailable" in n for n in plugin_of(a2).degraded())
            assert plugin_of(a2).readiness() is None and a2.ready
            assert metrics.REGISTRY.get_sample_value("aiwfe_auth_degraded", {"dependency": "redis"}) == 1

            assert await wait_until(lambda: jti in plugin_of(a1).denylist, timeout_s=5)

            # logout on pod auth while Redis is down: pod auth2 learns it from the TokenRevoked event
            jti = (await a1.kernel.call(Logout(token=tokens[0]))).jti
            assert await wait_until(lambda: jti in plugin_of(a2).denylist, timeout_s=5)
            await expect_invalid(a2.kernel.call(Verify(token=tokens[0])), "InvalidToken", "revoked")
            # and an event published from elsewhere (another pod's logout) is honoured too
            claims = await a2.kernel.call(Verify(token=tokens[1]))
            await pods["client"].kernel.publish(TokenRevoked(jti=claims.jti, exp=claims.exp))
            assert await wait_until(lambda: claims.jti in plugin_of(a1).denylist, timeout_s=5)
            await expect_invalid(a1.kernel.call(Verify(token=tokens[1])), "InvalidToken", "revoked")

            # Redis comes back on the same address: the breaker closes and revocations are shared again
            vk = EmbeddedValkey(tmp_path / "valkey", port=vk.port).start()
            token = (await a1.kernel.call(Login(username="erin", password=PASSWORD))).access_token
            cache = plugin_of(a1).cache
            assert cache is not None

            async def shared_again() -> bool:
                out = await a1.kernel.call(Logout(token=token))  # idempotent: retried until Redis takes it
                return any(j == out.jti for j, _ in await cache.revocations_since(0) or [])

            assert await wait_until(shared_again, timeout_s=10, every_s=0.1)
            assert plugin_of(a1).degraded() == []
    finally:
        vk.stop()


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_pool_exhaustion_answers_overloaded_at_once(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    cfg = auth_config(pg_url, redis_url, prefix, pool_min=1, pool_max=1, pool_max_waiting=1, pool_timeout_s=0.5)
    async with start_auth(cfg) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="frank", password=PASSWORD))
        store = plugin_of(pods["auth"]).store
        assert store is not None and store.pool is not None
        async with store.pool.connection():  # the only connection is busy
            assert metrics.REGISTRY.get_sample_value("aiwfe_db_pool_in_use", {"pool": "auth"}) == 1
            assert metrics.REGISTRY.get_sample_value("aiwfe_db_pool_utilization", {"pool": "auth"}) == 1.0
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(
                *(k.call(Login(username="frank", password=PASSWORD)) for _ in range(6)), return_exceptions=True
            )
            elapsed_s = loop.time() - t0
        assert all(isinstance(r, Overloaded) and r.retryable for r in results), results
        assert elapsed_s < 1.2, elapsed_s  # at most one pool timeout (0.5 s), never a hang
        messages = sorted(str(r) for r in results)
        assert sum("too many requests waiting" in m for m in messages) >= 4
        # the pool is free again: logins succeed
        assert (await k.call(Login(username="frank", password=PASSWORD))).access_token


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_login_burst_is_served_when_hashing_keeps_up(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    # The old system's failure: every login of a burst failed because the pool ran dry.
    async with start_auth(auth_config(pg_url, redis_url, prefix, pool_max=4)) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="gina", password=PASSWORD))
        results = await asyncio.gather(
            *(k.call(Login(username="gina", password=PASSWORD)) for _ in range(100)), return_exceptions=True
        )
        assert not [r for r in results if isinstance(r, BaseException)]


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_login_burst_beyond_hashing_capacity_is_refused_at_once(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    slow_kdf = {"kdf_time_cost": 2, "kdf_memory_kib": 19456, "kdf_workers": 1, "kdf_max_wait_s": 0.3}
    async with start_auth(auth_config(pg_url, redis_url, prefix, **slow_kdf)) as pods:
        k = pods["client"].kernel
        await k.call(Register(username="hugo", password=PASSWORD))
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        hints: list[float | None] = []

        async def timed_login() -> tuple[str, float]:
            try:
                await k.call(Login(username="hugo", password=PASSWORD))
                return "ok", loop.time() - t0
            except Overloaded as e:
                hints.append(e.retry_after_s)
                return "overloaded", loop.time() - t0

        results = await asyncio.gather(*(timed_login() for _ in range(40)))
        served = [t for kind, t in results if kind == "ok"]
        refused = [t for kind, t in results if kind == "overloaded"]
        assert 1 <= len(served) <= 25 and len(served) + len(refused) == 40, (len(served), len(refused))
        assert max(refused) < 0.25, max(refused)  # refused at once, not after queueing
        assert max(served) < 1.5, max(served)  # the admitted ones finish within about kdf_max_wait_s
        assert all(h is not None and h >= 1.0 for h in hints), hints  # the gate's own estimate, for Retry-After


async def test_migrations_race_on_one_schema(pg_url: str, redis_url: str, prefix: str) -> None:
    cfg = auth_config(pg_url, redis_url, prefix)

    def pod(i: int) -> PodRunner:
        data = {"system": {"subject_prefix": f"{prefix}{i}"}, "pods": {"auth": {"plugins": ["auth"]}}, "plugins": {"auth": cfg}}
        return PodRunner(parse_manifest(dump_toml(data), env={}), "auth", LocalBus(f"{prefix}{i}"), ops_port=0)

    pods = [pod(i) for i in range(4)]
    await asyncio.gather(*(p.start() for p in pods))
    try:
        async with await psycopg.AsyncConnection.connect(pg_url) as conn:
            rows = await (await conn.execute("SELECT version FROM auth_migrations ORDER BY version")).fetchall()
        assert rows == [("0001_users",), ("0002_disabled",)]  # each applied once
        store = plugin_of(pods[0]).store
        assert store is not None
        assert await store.migrate() == []  # nothing left to apply
        await pods[1].kernel.call(Register(username="hank", password=PASSWORD))
        await expect_invalid(pods[2].kernel.call(Register(username="hank", password=PASSWORD)), "UserExists", "user")
    finally:
        await asyncio.gather(*(p.stop() for p in pods))


@pytest.mark.parametrize("bus_kind", ["local"])
async def test_postgres_restart_fails_fast_then_recovers(
    start_auth: StartAuth, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        cfg = auth_config(pg.url, redis_url, prefix, pool_min=2, pool_max=4, pool_timeout_s=1.0, db_retry_s=0.5)
        async with start_auth(cfg) as pods:
            k = pods["client"].kernel
            await k.call(Register(username="ivy", password=PASSWORD))
            tok = await k.call(Login(username="ivy", password=PASSWORD))

            pg.kill()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Unavailable, match="database unavailable"):
                await k.call(Login(username="ivy", password=PASSWORD))
            first_s = loop.time() - t0
            assert first_s < 1.5, first_s  # at most one pool timeout
            t0 = loop.time()
            for _ in range(5):  # the breaker is open: no one waits for the pool
                with pytest.raises(Unavailable):
                    await k.call(Register(username="ivy2", password=PASSWORD))
            assert loop.time() - t0 < 0.5
            assert (await k.call(Verify(token=tok.access_token))).username == "ivy"  # no database needed
            assert any("database unavailable" in n for n in plugin_of(pods["auth"]).degraded())

            pg = EmbeddedPostgres(tmp_path / "pg", port=pg.port).start()
            t0 = loop.time()

            async def login_works() -> bool:
                try:
                    await k.call(Login(username="ivy", password=PASSWORD))
                    return True
                except Unavailable:
                    return False

            assert await wait_until(login_works, timeout_s=15, every_s=0.1)
            recovery_s = loop.time() - t0
            assert recovery_s < 5, recovery_s
            # once recovered, no broken connection is ever handed out (check on checkout)
            for _ in range(20):
                await k.call(Login(username="ivy", password=PASSWORD))
            assert plugin_of(pods["auth"]).degraded() == []
    finally:
        pg.stop()
