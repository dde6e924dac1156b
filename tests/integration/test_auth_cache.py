"""aiwfe.plugins.auth.cache against a real Redis: the shared revocation list, and Redis gone."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.integration


async def test_revocations_reach_a_pod_that_starts_later(redis_url: str, prefix: str) -> None:
    """What one pod revoked, a fresh denylist loads; a later read takes only what is new;
    entries older than the longest token lifetime are dropped on write."""
    from aiwfe.plugins.auth.cache import ClaimCache, Denylist

    cache = ClaimCache(redis_url, key_prefix=f"{prefix}:rev")
    exp = int(time.time()) + 600
    try:
        assert await cache.revoke("j1", exp, keep_s=700)
        assert await cache.revoke("j2", exp, keep_s=700)
        later = Denylist()
        assert await cache.load_revocations(later)
        assert "j1" in later and "j2" in later and len(later) == 2
        mark = time.time()
        assert await cache.revoke("j3", exp, keep_s=700)
        assert [j for j, _ in await cache.revocations_since(mark) or []] == ["j3"]
        await asyncio.sleep(0.05)
        assert await cache.revoke("j4", exp, keep_s=0.01)  # the others were written more than keep_s ago
        assert [j for j, _ in await cache.revocations_since(0) or []] == ["j4"]
    finally:
        await cache.close()


async def test_with_redis_gone_answers_at_once(prefix: str) -> None:
    from aiwfe.plugins.auth.cache import ClaimCache, Denylist

    cache = ClaimCache("redis://127.0.0.1:1/0", key_prefix=prefix, timeout_s=0.2)
    t0 = time.monotonic()
    try:
        assert not await cache.revoke("j", int(time.time()) + 600, keep_s=700)
        assert not cache.available and cache.status() is not None
        # breaker open: no waiting
        assert await cache.revocations_since(0) is None
        assert not await cache.load_revocations(Denylist())
        assert time.monotonic() - t0 < 1.0
    finally:
        await cache.close()
