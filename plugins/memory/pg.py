"""PostgreSQL helpers shared by the plugins that own tables: a bounded pool and migrations.

A pool is a ``psycopg_pool.AsyncConnectionPool`` with a hard size, a short checkout
timeout, a bounded wait queue and a liveness check on checkout; when it is exhausted the
caller gets :class:`kernel.errors.Overloaded` (retryable) at once instead of waiting.
Migrations are the ``*.sql`` files of a folder, applied in name order, each once, under a
transaction-scoped advisory lock so that replicas starting together apply them once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from kernel.errors import ConfigError, Overloaded, Unavailable

__all__ = ["connection", "database_url", "migrate", "open_pool", "read_scripts"]


def database_url(configured: str) -> str:
    """Return ``configured`` when set, else ``DATABASE_URL``.

    Raises:
        ConfigError: neither is set.
    """
    url = configured or os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError("no PostgreSQL URL: set DATABASE_URL or the plugin's database_url")
    return url


async def open_pool(url: str, *, name: str, max_size: int, timeout_s: float, max_waiting: int) -> AsyncConnectionPool:
    """Open a bounded pool and wait for its first connection.

    Raises:
        Unavailable: the server did not accept a connection within ``timeout_s`` (x4).
    """
    pool: AsyncConnectionPool = AsyncConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        timeout=timeout_s,
        max_waiting=max_waiting,
        check=AsyncConnectionPool.check_connection,
        kwargs={"autocommit": True},
        name=name,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=max(5.0, timeout_s * 4))
    except PoolTimeout as e:
        await pool.close()
        raise Unavailable(f"{name}: PostgreSQL did not answer: {e}") from None
    return pool


@contextlib.asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection]:
    """Check a connection out of ``pool`` (autocommit).

    Raises:
        Overloaded: every connection is in use and the wait timed out or the queue is full.
        Unavailable: the server does not accept connections or dropped one (both retryable).
    """
    try:
        cm = pool.connection()
        conn = await cm.__aenter__()
    except TooManyRequests as e:
        raise Overloaded(f"{pool.name}: database pool exhausted ({e})") from None
    except PoolTimeout as e:
        if pool.get_stats().get("pool_size", 0) < pool.max_size:
            # the pool had room to grow and could not: the server is not accepting connections
            raise Unavailable(f"{pool.name}: database unavailable ({e})") from None
        raise Overloaded(f"{pool.name}: database pool exhausted ({e})") from None
    try:
        yield conn
    except psycopg.OperationalError as e:
        await cm.__aexit__(type(e), e, e.__traceback__)
        raise Unavailable(f"{pool.name}: database unavailable ({e})") from None
    except BaseException as e:
        await cm.__aexit__(type(e), e, e.__traceback__)
        raise
    else:
        await cm.__aexit__(None, None, None)


def read_scripts(folder: Path) -> list[tuple[str, str]]:
    """Return ``(name, sql)`` of the ``*.sql`` files in ``folder``, in name order."""
    return [(p.name, p.read_text()) for p in sorted(folder.glob("*.sql"))]


async def migrate(pool: AsyncConnectionPool, plugin: str, folder: Path) -> list[str]:
    """Apply the ``*.sql`` files of ``folder`` not yet recorded for ``plugin``; return their names.

    Tables are created unqualified, so they land in the connection's search_path.
    """
    scripts = read_scripts(folder)  # read before holding a connection
    applied: list[str] = []
    async with connection(pool) as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"aiwfe-migrate:{plugin}",))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS aiwfe_migrations ("
            " plugin text NOT NULL, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (plugin, name))"
        )
        cur = await conn.execute("SELECT name FROM aiwfe_migrations WHERE plugin = %s", (plugin,))
        done = {r[0] for r in await cur.fetchall()}
        for name, sql in scripts:
            if name in done:
                continue
            await conn.execute(sql)  # type: ignore[arg-type]
            await conn.execute("INSERT INTO aiwfe_migrations (plugin, name) VALUES (%s, %s)", (plugin, name))
            applied.append(name)
    return applied
