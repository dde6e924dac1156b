"""Helios quorums (``min_answers``) and per-job token budgets, on LocalBus with the extractive provider."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.helios.budget import TokenBudget, estimate_tokens
from aiwfe.plugins.helios.contract import Ask
from aiwfe.plugins.helios.plugin import HeliosPlugin

# Three database experts: two quick, one slow (simulated extractive latency per expert).
M = """
[system]
subject_prefix = "{prefix}"
[pods.all]
plugins = ["helios", "perception", "reasoning"]
[plugins.helios]
fallback_experts = ["quick"]
cache_prefix = "{prefix}:"
database_url = "{db}"
{extra}
[[plugins.helios.experts]]
name = "quick"
role = "database administrator"
expertise = {{database = 1.0}}
latency_s = 0.02
[[plugins.helios.experts]]
name = "steady"
role = "data engineer"
expertise = {{database = 0.9}}
latency_s = 0.1
[[plugins.helios.experts]]
name = "slow"
role = "backend engineer"
expertise = {{database = 0.8}}
latency_s = 20.0
"""


@contextlib.asynccontextmanager
async def helios(prefix: str, extra: str = "", db: str = "") -> AsyncIterator[PodRunner]:
    m = parse_manifest(M.format(prefix=prefix, extra=extra, db=db), env={})
    async with PodRunner(m, "all", LocalBus(prefix), ops_port=0) as pod:
        yield pod


async def run(pod: PodRunner, ask: Ask) -> tuple[Any, dict[str, Any], list[Any]]:
    k = pod.kernel
    job_id = await k.submit(ask)
    rec = await k.wait_job(job_id, timeout_s=20)
    events = [ev async for ev in k.job_events(job_id)]
    result = msgspec.msgpack.decode(rec.result) if rec.result else {}
    return rec, result, events


def test_budget_reserves_and_settles() -> None:
    b = TokenBudget(100)
    assert b.reserve(30, 50, 10) == 50 and b.left == 20
    assert b.reserve(15, 50, 10) is None  # 15 + 10 does not fit in 20
    assert b.reserve(5, 50, 10) == 15 and b.left == 0
    b.settle(80, 40)
    assert (b.spent, b.reserved, b.left) == (40, 20, 40)
    assert estimate_tokens("four words in here") == 5  # 18 characters / 4, rounded up


async def test_quorum_synthesises_at_k_and_cancels_the_rest(prefix: str) -> None:
    async with helios(prefix) as pod:
        t0 = time.perf_counter()
        rec, result, events = await run(pod, Ask(text="database indexes", max_experts=3, min_answers=2))
        assert rec.status == "done", rec.error
        assert time.perf_counter() - t0 < 5, "waited for the slow expert"
        status = {e["expert"]: e["status"] for e in result["experts"]}
        assert status == {"quick": "answered", "steady": "answered", "slow": "cancelled"}
        assert result["min_answers"] == 2
        slow = next(e for e in result["experts"] if e["expert"] == "slow")
        assert slow["tokens"] > 0  # charged its prompt: the model had it
        assert result["tokens_spent"] == sum(e["tokens"] for e in result["experts"])
        types = [ev.type for ev in events]
        assert types.count("helios.expert_answered") == 2
        assert types.count("helios.expert_cancelled") == 1
        assert types.index("helios.expert_cancelled") < types.index("job.done")
        assert await _idle(pod), "the cancelled expert call is still running"


async def test_quorum_is_capped_at_the_experts_selected(prefix: str) -> None:
    async with helios(prefix) as pod:
        rec, result, events = await run(pod, Ask(text="database indexes", max_experts=2, min_answers=99))
        assert rec.status == "done", rec.error
        assert result["min_answers"] == 2
        assert [e["status"] for e in result["experts"]] == ["answered", "answered"]
        selected = next(ev for ev in events if ev.type == "helios.selected")
        assert selected.data["min_answers"] == 2


async def test_token_budget_is_enforced_across_experts(prefix: str) -> None:
    # Each call reserves its prompt (~30 tokens) + expert_max_tokens 100: room for two calls, not three.
    extra = "expert_max_tokens = 100\nmin_completion_tokens = 50"
    async with helios(prefix, extra) as pod:
        rec, result, events = await run(pod, Ask(text="database indexes", max_experts=2, token_budget=270, use_cache=False))
        assert rec.status == "done", rec.error
        assert result["token_budget"] == 270
        assert [e["status"] for e in result["experts"]] == ["answered", "answered"]
        assert all(0 < e["tokens"] for e in result["experts"])
        assert result["tokens_spent"] == sum(e["tokens"] for e in result["experts"]) <= 270

        rec, result, events = await run(pod, Ask(text="database indexes", max_experts=3, token_budget=270, use_cache=False))
        assert rec.status == "done", rec.error
        status = {e["expert"]: e["status"] for e in result["experts"]}
        assert status["slow"] == "skipped", status
        assert result["tokens_spent"] <= 270
        started = [ev.data for ev in events if ev.type == "helios.expert_started"]
        assert len(started) == 2 and sum(s["tokens_reserved"] for s in started) <= 270
        skipped = [ev.data for ev in events if ev.type == "helios.expert_skipped"]
        assert skipped[0]["expert"] == "slow" and "token budget" in skipped[0]["reason"]


async def test_token_budget_is_capped_server_side(prefix: str) -> None:
    async with helios(prefix, "max_token_budget = 1000\ndefault_token_budget = 500") as pod:
        _, result, _ = await run(pod, Ask(text="database", max_experts=1, token_budget=10**9))
        assert result["token_budget"] == 1000
        _, result, _ = await run(pod, Ask(text="database", max_experts=1))
        assert result["token_budget"] == 500
        _, result, _ = await run(pod, Ask(text="database", max_experts=1, token_budget=-5, min_answers=-1))
        assert (result["token_budget"], result["min_answers"]) == (500, 0)


async def test_nothing_fits_fails_the_job_with_the_reason(prefix: str) -> None:
    async with helios(prefix) as pod:
        rec, _, _ = await run(pod, Ask(text="database", max_experts=3, token_budget=10, use_cache=False))
        assert rec.status == "failed" and rec.error is not None
        assert "skipped" in rec.error["message"] and "token budget" in rec.error["message"]


@pytest.mark.integration
async def test_outcomes_and_spend_are_stored(prefix: str, pg_url: str) -> None:
    import psycopg

    async with helios(prefix, db=pg_url) as pod:
        rec, result, _ = await run(pod, Ask(text="database indexes", max_experts=3, min_answers=2, use_cache=False))
        assert rec.status == "done", rec.error
    async with await psycopg.AsyncConnection.connect(pg_url) as conn:
        run_row = await (await conn.execute("SELECT min_answers, token_budget, tokens_spent FROM helios_runs")).fetchone()
        rows = await (await conn.execute("SELECT expert, status, tokens FROM helios_answers ORDER BY expert")).fetchall()
    assert run_row == (2, result["token_budget"], result["tokens_spent"])
    assert rows == sorted((e["expert"], e["status"], e["tokens"]) for e in result["experts"])
    assert ("slow", "cancelled") in [(r[0], r[1]) for r in rows]


def test_config_rejects_a_default_budget_above_the_cap() -> None:
    config = HeliosPlugin.Config(default_token_budget=10, max_token_budget=5)
    assert any("default_token_budget" in str(p) for p in HeliosPlugin.validate_config(config))


async def _idle(pod: PodRunner) -> bool:
    from tests.conftest import wait_until

    return await wait_until(lambda: all(ep.limiter.active == 0 for ep in pod.kernel.endpoints.values()), timeout_s=2)


async def test_cache_honours_a_cancel_that_redis_lost() -> None:
    import asyncio

    from aiwfe.plugins.helios.cache import AnswerCache

    class Swallowing:  # what redis-py can do with a cancel that lands mid-command
        async def get(self, key: str) -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    cache = AnswerCache("", "p:", 60)
    cache.redis = Swallowing()  # type: ignore[assignment]
    t = asyncio.create_task(cache.get("k"))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
