"""PostgreSQL persistence of helios runs: one statement per job, written once.

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

import msgspec
from psycopg_pool import AsyncConnectionPool, PoolClosed

from aiwfe.kernel import pg
from aiwfe.kernel.errors import Overloaded, Unavailable

from .contract import ExpertAnswer, Synthesis

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
        """Store the run and every expert answer at once (one statement); False if already stored.

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
        """One statement writes the run and its answers (atomic on its own in autocommit).

        Before, a save was a transaction of four round trips and a pipeline of one INSERT per
        expert: at 1,000 jobs finishing together, a large share of this process's CPU went to
        psycopg (``aiwfe bench helios --concurrent 1000``, py-spy). The answers now travel as
        one JSON array (encoded by msgspec, expanded by ``json_to_recordset``); a JSON number
        is written with the shortest form that reads back as the same double, so every value
        is stored as it was. A NUL character, which no PostgreSQL text may hold, is stored as
        U+FFFD in an answer or error instead of failing the finished job. When the run is
        already stored, ``run`` is empty and no answer is written.
        """
        assert self.pool is not None
        answers = _answers_json.encode(result.experts)
        if b"\\u0000" in answers:  # a NUL (or a text that spells one out: then nothing changes)
            answers = _answers_json.encode([_without_nul(a) for a in result.experts])
        async with pg.connection(self.pool) as conn:
            with pg.QUERY_SECONDS.labels("helios").time():
                cur = await conn.execute(
                    _SAVE,
                    (
                        job_id,
                        owner,
                        question.replace("\x00", "\ufffd"),
                        result.answer.replace("\x00", "\ufffd"),
                        result.confidence,
                        result.elapsed_ms,
                        result.min_answers,
                        result.token_budget,
                        result.tokens_spent,
                        answers.decode(),
                    ),
                )
                row = await cur.fetchone()
        return bool(row and row[0])


_answers_json = msgspec.json.Encoder()


def _without_nul(a: ExpertAnswer) -> ExpertAnswer:
    def clean(t: str) -> str:
        return t.replace("\x00", "\ufffd")

    return msgspec.structs.replace(
        a, expert=clean(a.expert), status=clean(a.status), answer=clean(a.answer), error=clean(a.error)
    )


_SAVE = (
    "WITH run AS ("
    " INSERT INTO helios_runs (job_id, owner, question, answer, confidence, elapsed_ms,"
    " min_answers, token_budget, tokens_spent)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING RETURNING job_id),"
    " answers AS ("
    " INSERT INTO helios_answers"
    " (job_id, expert, status, answer, confidence, weight, latency_ms, cached, error, tokens)"
    " SELECT run.job_id, a.expert, a.status, a.answer, a.confidence, a.weight, a.latency_ms, a.cached, a.error, a.tokens"
    " FROM run, json_to_recordset(%s::json) AS a(expert text, status text, answer text, confidence float8,"
    " weight float8, latency_ms float8, cached bool, error text, tokens int))"
    " SELECT count(*) FROM run"
)


def database_url(configured: str) -> str:
    """The configured URL, else ``DATABASE_URL``; empty when neither is set."""
    return configured or os.environ.get("DATABASE_URL", "")
