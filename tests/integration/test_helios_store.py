"""helios's run store under a burst (real PostgreSQL): saves wait their turn in the process
instead of failing at the pool's own queue limit, and a save that waits too long is a
retryable Overloaded."""

from __future__ import annotations

import asyncio

import pytest

from aiwfe.kernel.errors import Overloaded, Unavailable
from aiwfe.plugins.helios.contract import ExpertAnswer, Synthesis
from aiwfe.plugins.helios.store import RunStore

pytestmark = pytest.mark.integration

RESULT = Synthesis(
    answer="a",
    confidence=0.5,
    experts=[ExpertAnswer(expert=f"e{i}", status="answered", answer="x", confidence=0.5) for i in range(12)],
)


async def test_a_burst_of_saves_larger_than_the_pool_queue_all_succeed(pg_url: str) -> None:
    store = RunStore(pg_url, pool_max=2, max_waiting=3)  # the pool alone would refuse all but 5 at once
    await store.open()
    try:
        saved = await asyncio.gather(*(store.save(f"job-{i}", "u", "q", RESULT) for i in range(80)))
        assert saved == [True] * 80
        assert await store.save("job-0", "u", "q", RESULT) is False  # written once
        assert store.pool is not None
        async with store.pool.connection() as conn:
            runs = await (await conn.execute("SELECT count(*) FROM helios_runs")).fetchone()
            answers = await (await conn.execute("SELECT count(*) FROM helios_answers")).fetchone()
        assert runs == (80,) and answers == (80 * 12,)
    finally:
        await store.close()


async def test_a_save_that_gets_no_turn_in_time_is_overloaded_and_retryable(pg_url: str) -> None:
    store = RunStore(pg_url, pool_max=1, queue_s=0.2)
    await store.open()
    try:
        await store._turns.acquire()  # the one turn is taken (a save stuck on a slow database)
        with pytest.raises(Overloaded, match="no turn at the run store") as e:
            await store.save("late", "u", "q", RESULT)
        assert e.value.retryable and e.value.retry_after_s
        store._turns.release()
        assert await store.save("late", "u", "q", RESULT) is True
    finally:
        await store.close()
    with pytest.raises(Unavailable, match="closing") as closed:  # a save after close: retryable, not a crash
        await store.save("after", "u", "q", RESULT)
    assert closed.value.retryable


async def test_a_saved_run_reads_back_field_for_field_and_no_experts_is_a_run_without_answers(pg_url: str) -> None:
    """The run and its answers are written by one statement (columns travel as arrays):
    every value comes back as it was given, of every column type."""
    experts = [
        ExpertAnswer(
            expert="security",
            status="answered",
            answer="Ünïcode ✓ 'q'",
            confidence=0.875,
            weight=1.25,
            latency_ms=12.5,
            cached=True,
            tokens=2**31 - 1,
        ),
        ExpertAnswer(expert="database", status="timed_out", error="budget 2 s", tokens=0),
        ExpertAnswer(expert="deploy", status="skipped"),
    ]
    full = Synthesis(
        answer="A", confidence=0.25, experts=experts, elapsed_ms=9.5, min_answers=2, token_budget=700, tokens_spent=123
    )
    store = RunStore(pg_url, pool_max=1)
    await store.open()
    try:
        assert await store.save("full", "alice", "why?", full) is True
        assert await store.save("empty", "bob", "q", Synthesis(answer="", confidence=0.0)) is True
        assert await store.save("full", "mallory", "other", RESULT) is False  # written once: nothing replaced or added
        assert store.pool is not None
        async with store.pool.connection() as conn:
            run = await (
                await conn.execute(
                    "SELECT owner, question, answer, confidence, elapsed_ms, min_answers, token_budget, tokens_spent"
                    " FROM helios_runs WHERE job_id = 'full'"
                )
            ).fetchone()
            rows = await (
                await conn.execute(
                    "SELECT expert, status, answer, confidence, weight, latency_ms, cached, error, tokens"
                    " FROM helios_answers WHERE job_id = 'full' ORDER BY expert"
                )
            ).fetchall()
            empty = await (await conn.execute("SELECT count(*) FROM helios_answers WHERE job_id = 'empty'")).fetchone()
            runs = await (await conn.execute("SELECT count(*) FROM helios_runs WHERE job_id = 'empty'")).fetchone()
        assert run == ("alice", "why?", "A", 0.25, 9.5, 2, 700, 123)
        assert rows == sorted(
            (e.expert, e.status, e.answer, e.confidence, e.weight, e.latency_ms, e.cached, e.error, e.tokens) for e in experts
        )
        assert empty == (0,) and runs == (1,)
    finally:
        await store.close()


async def test_a_nul_is_stored_as_u_fffd_and_a_text_spelling_one_out_is_kept(pg_url: str) -> None:
    """PostgreSQL text cannot hold NUL: a model's answer with one must not fail the finished
    job. A text that merely contains the six characters backslash-u0000 is stored as is."""
    spelled = "the escape \\u0000 in JSON"
    experts = [
        ExpertAnswer(expert="a", status="answered", answer="x\x00y", error="e\x00"),
        ExpertAnswer(expert="b", status="answered", answer=spelled),
    ]
    store = RunStore(pg_url, pool_max=1)
    await store.open()
    try:
        assert await store.save("nul", "u", "q\x00?", Synthesis(answer="s\x00", confidence=0.1, experts=experts)) is True
        assert await store.save("spelled", "u", "q", Synthesis(answer="s", confidence=0.1, experts=experts[1:])) is True
        assert store.pool is not None
        async with store.pool.connection() as conn:
            run = await (await conn.execute("SELECT question, answer FROM helios_runs WHERE job_id = 'nul'")).fetchone()
            rows = await (
                await conn.execute("SELECT job_id, expert, answer, error FROM helios_answers ORDER BY job_id, expert")
            ).fetchall()
        assert run == ("q\ufffd?", "s\ufffd")
        assert rows == [("nul", "a", "x\ufffdy", "e\ufffd"), ("nul", "b", spelled, ""), ("spelled", "b", spelled, "")]
    finally:
        await store.close()
