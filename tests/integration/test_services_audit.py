"""Cancellations that psycopg_pool and redis-py lose on Python 3.11, and what they cost.

Both libraries wait under ``asyncio.wait_for`` (psycopg_pool for a connection, redis-py while
writing a command); on Python 3.11 that returns the result and drops a cancellation that
arrives as the awaited thing completes. Each test cancels a task at the suspension points right
after it starts (``j`` loop turns), where the loss happened every time before the fixes.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest

pytestmark = pytest.mark.integration


async def _turns(j: int) -> None:
    for _ in range(j):
        await asyncio.sleep(0)


async def _cancel(task: asyncio.Task[Any]) -> int:
    """Cancel ``task`` and wait for it: 1 when the cancellation was lost (it ended normally)."""
    assert task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return 0
    return 1


async def test_a_task_cancelled_as_the_pool_hands_it_a_connection_is_cancelled(database_url: str) -> None:
    from aiwfe.kernel import pg

    pool = await pg.open_pool(database_url, name="audit-cancel", max_size=1, timeout_s=5, max_waiting=10)
    ran: list[tuple[int, int]] = []

    async def waiter(key: tuple[int, int]) -> None:
        async with pg.connection(pool) as conn:
            await conn.execute("SELECT 1")
            ran.append(key)

    try:
        lost = 0
        for rnd in range(5):
            for j in range(4):
                async with pg.connection(pool):  # hold the only connection: the waiter queues
                    task = asyncio.create_task(waiter((rnd, j)))
                    await asyncio.sleep(0.005)
                await _turns(j)  # the connection is being handed to the waiter
                lost += await _cancel(task)
        assert (lost, ran) == (0, [])
        async with pg.connection(pool) as conn:  # the pool is whole and serves
            assert await (await conn.execute("SELECT 7")).fetchone() == (7,)
        assert pool.get_stats()["pool_size"] == 1
    finally:
        await pool.close()


async def test_the_auth_user_store_keeps_a_cancellation_during_checkout(pg_url: str) -> None:
    from aiwfe.plugins.auth.store import UserStore

    store = UserStore(pg_url, name="audit-auth", min_size=1, max_size=1)
    await store.open()
    found: list[int] = []

    async def find(k: int) -> None:
        await store.find_user(f"nobody{k}")
        found.append(k)

    try:
        lost = 0
        for k in range(12):
            async with store.connection():
                task = asyncio.create_task(find(k))
                await asyncio.sleep(0.005)
            await _turns(k % 3)
            lost += await _cancel(task)
        assert (lost, found) == (0, [])
        assert await store.find_user("nobody") is None
        assert store.breaker.closed
    finally:
        await store.close()


async def test_a_claim_cache_command_cancelled_while_written_is_cancelled(redis_url: str, prefix: str) -> None:
    from aiwfe.plugins.auth.cache import ClaimCache

    cache = ClaimCache(redis_url, key_prefix=prefix)
    key = f"{prefix}:audit"
    try:
        assert (await cache.execute(lambda: cache.client.set(key, b"0")))[0]
        lost = 0
        for i in range(30):
            task = asyncio.create_task(cache.execute(lambda i=i: cache.client.set(key, str(i))))
            await _turns(1 + i % 3)  # inside redis-py's write
            lost += await _cancel(task)
        assert lost == 0
        assert cache.breaker.closed and cache.breaker.failures == 0  # a cancellation is no Redis failure
        ok, value = await cache.execute(lambda: cache.client.get(key))
        assert ok and value is not None
    finally:
        await cache.client.delete(key)
        await cache.close()


async def test_a_login_admission_cancelled_leaves_no_attempt_counted(redis_url: str, prefix: str) -> None:
    from aiwfe.plugins.auth.cache import ClaimCache
    from aiwfe.plugins.auth.throttle import LoginThrottle

    cache = ClaimCache(redis_url, key_prefix=prefix)
    throttle = LoginThrottle(cache, prefix=prefix, addr_free=0)
    users = [f"user{i}" for i in range(24)]

    def count_key(user: str) -> str:
        return f"{prefix}:throttle:user:{hashlib.sha256(user.encode()).hexdigest()}"

    try:
        await throttle.admit("warm", "")
        await throttle.release("warm", "")
        outcome: dict[str, Any] = {}
        for i, user in enumerate(users):
            task = asyncio.create_task(throttle.admit(user, ""))
            await _turns(1 + i % 6)  # the script written, or its reply awaited
            if not task.cancel():  # already done: an ordinary admission
                await task
                await throttle.release(user, "")
                continue
            try:
                await task
                outcome[user] = "admitted"
                await throttle.release(user, "")  # what login() does with an attempt it was given
            except asyncio.CancelledError:
                outcome[user] = "cancelled"
        await asyncio.sleep(0.05)
        counted = [u for u in users if int(await cache.client.get(count_key(u)) or 0)]
        assert counted == []
        assert "cancelled" in outcome.values()
    finally:
        keys = [k async for k in cache.client.scan_iter(f"{prefix}:*")]
        if keys:
            await cache.client.delete(*keys)
        await cache.close()
