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
