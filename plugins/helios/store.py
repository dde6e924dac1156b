"""PostgreSQL persistence of helios runs: one transaction per job, written once.

The pool is bounded (``aiwfe.kernel.pg``): a full pool answers :class:`aiwfe.kernel.errors.Overloaded`
at once, an unreachable server :class:`aiwfe.kernel.errors.Unavailable`. No connection is held
while experts run: the store is touched once, after synthesis.

A save waits its turn: at most ``pool_max`` saves use the pool at once and the others wait in
this process, first come first served, for up to ``queue_s`` (then ``Overloaded``). A save is
the end of a finished job, whose experts' work is lost if it fails: 1,000 jobs finishing
together used to meet the pool's own queue limit (100 waiting) at once, and 110 of them were
dead-lettered after three attempts of the whole job each (``aiwfe bench helios --concurrent
1000`` with ``DATABASE_URL`` set).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from psycopg_pool import AsyncConnectionPool, PoolClosed

from aiwfe.kernel import pg
from aiwfe.kernel.errors import Overloaded, Unavailable

from .contract import Synthesis

__all__ = ["RunStore", "database_url"]

_MIGRATIONS = Path(__file__).parent / "migrations"


class RunStore:
    """Runs and expert answers in PostgreSQL at ``url``."""

    def __init__(
        self, url: str, *, pool_max: int = 10, timeout_s: float = 2.0, max_waiting: int = 100, queue_s: float = 60.0
    ) -> None:
        self.url = url
        self.pool_max = pool_max
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.queue_s = queue_s
        self.pool: AsyncConnectionPool | None = None
        self._turns = asyncio.Semaphore(pool_max)  # saves using the pool; the rest wait here (module doc)

    async def open(self) -> None:
        """Open the pool and apply migrations (under an advisory lock: replicas never race).

        Raises:
            Unavailable: PostgreSQL did not answer.
        """
        self.pool = await pg.open_pool(
            self.url, name="helios", max_size=self.pool_max, timeout_s=self.timeout_s, max_waiting=self.max_waiting
        )
        await pg.migrate(self.pool, "helios", _MIGRATIONS)

    async def close(self) -> None:
        """Close the pool."""
        if self.pool is not None:
            await self.pool.close()

    async def save(self, job_id: str, owner: str, question: str, result: Synthesis) -> bool:
        """Store the run and every expert answer in one transaction; False if already stored.

        Raises:
            Overloaded: no turn within ``queue_s``, or the pool is exhausted (retryable).
            Unavailable: the database cannot be reached, or the store is closing (retryable).
        """
        assert self.pool is not None, "RunStore.open() first"
        try:
            async with asyncio.timeout(self.queue_s):
                await self._turns.acquire()
        except TimeoutError:
            raise Overloaded(f"helios: no turn at the run store within {self.queue_s:g} s", retry_after_s=5.0) from None
        try:
            return await self._save(job_id, owner, question, result)
        except PoolClosed:  # the pod is stopping: another replica (or this one restarted) saves it
            raise Unavailable("helios: the run store is closing") from None
        finally:
            self._turns.release()

    async def _save(self, job_id: str, owner: str, question: str, result: Synthesis) -> bool:
        assert self.pool is not None
        async with pg.connection(self.pool) as conn, conn.transaction():
            with pg.QUERY_SECONDS.labels("helios").time():
                cur = await conn.execute(
                    "INSERT INTO helios_runs (job_id, owner, question, answer, confidence, elapsed_ms,"
                    " min_answers, token_budget, tokens_spent)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
                    (
                        job_id,
                        owner,
                        question,
                        result.answer,
                        result.confidence,
                        result.elapsed_ms,
                        result.min_answers,
                        result.token_budget,
                        result.tokens_spent,
                    ),
                )
                if cur.rowcount == 0:
                    return False
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO helios_answers"
                        " (job_id, expert, status, answer, confidence, weight, latency_ms, cached, error, tokens)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [
                            (
                                job_id,
                                a.expert,
                                a.status,
                                a.answer,
                                a.confidence,
                                a.weight,
                                a.latency_ms,
                                a.cached,
                                a.error,
                                a.tokens,
                            )
                            for a in result.experts
                        ],
                    )
            return True


def database_url(configured: str) -> str:
    """The configured URL, else ``DATABASE_URL``; empty when neither is set."""
    return configured or os.environ.get("DATABASE_URL", "")
