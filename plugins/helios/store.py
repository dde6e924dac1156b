"""PostgreSQL persistence of helios runs: one transaction per job, written once.

The pool is bounded with a short wait and a bounded queue; a full pool answers
:class:`kernel.errors.Overloaded` at once. No connection is held while experts run:
the store is touched once, after synthesis.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from kernel.errors import Overloaded, Unavailable

from .contract import Synthesis

__all__ = ["RunStore"]

_MIGRATIONS = Path(__file__).parent / "migrations"


class RunStore:
    """Runs and expert answers in PostgreSQL at ``url``."""

    def __init__(self, url: str, *, pool_max: int = 10, timeout_s: float = 2.0, max_waiting: int = 100) -> None:
        self.url = url
        self.pool = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_max,
            timeout=timeout_s,
            max_waiting=max_waiting,
            check=AsyncConnectionPool.check_connection,
            open=False,
            name="helios",
        )

    async def open(self) -> None:
        """Open the pool and apply migrations under an advisory lock (replicas never race)."""
        await self.pool.open(wait=True, timeout=10)
        key = int.from_bytes(hashlib.sha256(b"aiwfe.helios.migrations").digest()[:8], "big", signed=True)
        async with self.pool.connection() as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            try:
                for path in sorted(_MIGRATIONS.glob("*.sql")):
                    await conn.execute(path.read_text())  # idempotent DDL (IF NOT EXISTS)
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

    async def close(self) -> None:
        """Close the pool."""
        await self.pool.close()

    async def save(self, job_id: str, owner: str, question: str, result: Synthesis) -> bool:
        """Store the run and every expert answer in one transaction; False if already stored.

        Raises:
            Overloaded: the pool is exhausted (retryable).
            Unavailable: the database cannot be reached.
        """
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(
                    "INSERT INTO helios_runs (job_id, owner, question, answer, confidence, elapsed_ms)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
                    (job_id, owner, question, result.answer, result.confidence, result.elapsed_ms),
                )
                if cur.rowcount == 0:
                    return False
                async with conn.cursor() as c:
                    await c.executemany(
                        "INSERT INTO helios_answers"
                        " (job_id, expert, status, answer, confidence, weight, latency_ms, cached, error)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [
                            (job_id, a.expert, a.status, a.answer, a.confidence, a.weight, a.latency_ms, a.cached, a.error)
                            for a in result.experts
                        ],
                    )
                return True
        except (PoolTimeout, TooManyRequests) as e:
            raise Overloaded(f"helios store: database pool exhausted ({e})") from None
        except OSError as e:
            raise Unavailable(f"helios store: database unreachable ({e})") from None


def database_url(configured: str) -> str:
    """The configured URL, else ``DATABASE_URL``; empty when neither is set."""
    return configured or os.environ.get("DATABASE_URL", "")
