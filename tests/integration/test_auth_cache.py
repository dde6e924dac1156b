"""aiwfe.plugins.auth.cache against a real Redis: batching, and Redis gone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from aiwfe.plugins.auth.contract import Claims

pytestmark = pytest.mark.integration


async def test_claim_cache_batches_a_burst_into_few_pipelines(redis_url: str, prefix: str) -> None:
    """A burst of lookups and stores shares round trips; every answer is still its own."""
    from aiwfe.plugins.auth.cache import ClaimCache

    cache = ClaimCache(redis_url, key_prefix=f"{prefix}:batch")
    pipelines = 0
    make_pipeline = cache.client.pipeline

    def counting_pipeline(*a: Any, **kw: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return make_pipeline(*a, **kw)

    cache.client.pipeline = counting_pipeline
    exp = int(time.time()) + 600
    try:
        stored = [Claims(sub=f"u{i}", username=f"u{i}", jti=f"j{i}", exp=exp, iat=exp - 600) for i in range(0, 500, 2)]
        for c in stored:
            cache.store(f"d{c.sub[1:]}", c)
        await cache.revoke("d-none", "j3", exp)  # one jti revoked (a separate round trip)
        results = await asyncio.gather(*(cache.lookup(f"d{i}", f"j{i}") for i in range(500)))
        assert pipelines <= 10, pipelines
        for i, (ok, claims, revoked) in enumerate(results):
            assert ok
            assert (claims is not None) == (i % 2 == 0), i
            assert claims is None or claims.sub == f"u{i}"
            assert revoked == (i == 3)
    finally:
        await cache.close()


async def test_claim_cache_with_redis_gone_answers_at_once_and_counts_lost_stores(prefix: str) -> None:
    from aiwfe.plugins.auth.cache import ClaimCache

    lost: list[int] = []
    cache = ClaimCache("redis://127.0.0.1:1/0", key_prefix=prefix, timeout_s=0.2, on_store_lost=lost.append)
    exp = int(time.time()) + 600
    try:
        cache.store("d1", Claims(sub="u", username="u", jti="j", exp=exp, iat=exp - 600))
        t0 = time.monotonic()
        results = await asyncio.gather(*(cache.lookup(f"d{i}", "j") for i in range(50)))
        assert all(r == (False, None, False) for r in results)
        assert sum(lost) == 1
        assert not cache.available
        # breaker open: no queueing, no waiting
        assert await cache.lookup("d1", "j") == (False, None, False)
        assert time.monotonic() - t0 < 1.0
    finally:
        await cache.close()
