"""PostgreSQL support for plugins that own tables: a bounded pool, checkout, migrations, metrics.

The kernel itself never imports this module (only plugins do), so pods without a
database plugin do not load psycopg.

A pool is a ``psycopg_pool.AsyncConnectionPool`` with a hard size, a short checkout
timeout, a bounded wait queue and a liveness check on checkout; when it is exhausted the
caller gets :class:`aiwfe.kernel.errors.Overloaded` (retryable) at once instead of waiting.
The liveness check (an empty query, one round trip) is skipped for a connection that
:func:`connection` saw used without error less than :data:`RECENT_S` ago: a busy pool
pinged before every statement, which doubled the round trips of one-statement checkouts
(helios's run store under ``aiwfe bench helios --concurrent 1000``). The price: a server
that dropped such a connection in that second fails one statement with ``Unavailable``
(retryable), and the pool then discards the connection.
Migrations are the ``*.sql`` files of a folder, applied in name order, each once, under a
transaction-scoped advisory lock so that replicas starting together apply them once.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from aiwfe.kernel import metrics
from aiwfe.kernel.cancels import cancellations, raise_if_cancelled_since
from aiwfe.kernel.errors import ConfigError, Overloaded, Unavailable

__all__ = [
    "QUERY_SECONDS",
    "RECENT_S",
    "check_unless_recent",
    "connection",
    "database_url",
    "migrate",
    "open_pool",
    "pooled",
    "read_scripts",
    "watch",
]

_pools: weakref.WeakSet[AsyncConnectionPool] = weakref.WeakSet()

RECENT_S = 1.0
"""A connection used without error less than this long ago is checked out without a ping."""
_used: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()


async def check_unless_recent(conn: psycopg.AsyncConnection) -> None:
    """The pools' checkout check (module docstring): ping unless used in good order moments ago.

    Raises:
        psycopg.Error: the ping failed (the pool discards the connection and takes another).
    """
    t = _used.get(conn)
    if t is not None and time.monotonic() - t < RECENT_S and not conn.broken and not conn.closed:
        return
    await AsyncConnectionPool.check_connection(conn)


def watch(pool: AsyncConnectionPool) -> None:
    """Export ``pool`` in the ``aiwfe_db_pool_*`` gauges (``open_pool`` does this itself)."""
    _pools.add(pool)


class _PoolCollector(Collector):
    """``aiwfe_db_pool_*`` gauges read from every watched pool's ``get_stats()``.

    Pools with the same name (replicas of a plugin in one process, as tests run them)
    are summed.
    """

    def collect(self) -> Iterator[GaugeMetricFamily]:
        size = GaugeMetricFamily("aiwfe_db_pool_size", "Connections open in the pool", labels=["pool"])
        in_use = GaugeMetricFamily("aiwfe_db_pool_in_use", "Connections checked out", labels=["pool"])
        waiting = GaugeMetricFamily("aiwfe_db_pool_waiting", "Requests waiting for a connection", labels=["pool"])
        util = GaugeMetricFamily("aiwfe_db_pool_utilization", "Checked-out connections / max_size (0..1)", labels=["pool"])
        sums: dict[str, list[int]] = {}
        for pool in list(_pools):
            if pool.closed:
                continue
            s = pool.get_stats()
            acc = sums.setdefault(pool.name, [0, 0, 0, 0])
            acc[0] += s.get("pool_size", 0)
            acc[1] += s.get("pool_size", 0) - s.get("pool_available", 0)
            acc[2] += s.get("requests_waiting", 0)
            acc[3] += s.get("pool_max", pool.max_size)
        for name, (n, used, wait, cap) in sorted(sums.items()):
            size.add_metric([name], n)
            in_use.add_metric([name], used)
            waiting.add_metric([name], wait)
            util.add_metric([name], used / cap if cap else 0.0)
        yield from (size, in_use, waiting, util)


metrics.REGISTRY.register(_PoolCollector())

QUERY_SECONDS = Histogram(
    "aiwfe_db_query_seconds",
    "Time of one database statement, connection checkout excluded",
    ["pool"],
    registry=metrics.REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


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
        check=check_unless_recent,
        kwargs={"autocommit": True},
        name=name,
        open=False,
    )
    try:
        await pool.open(wait=True, timeout=max(5.0, timeout_s * 4))
    except PoolTimeout as e:
        await pool.close()
        raise Unavailable(f"{name}: PostgreSQL did not answer: {e}") from None
    watch(pool)
    return pool


@contextlib.asynccontextmanager
async def connection(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection]:
    """Check a connection out of ``pool`` (autocommit).

    Raises:
        Overloaded: every connection is in use and the wait timed out or the queue is full.
        Unavailable: the server does not accept connections or dropped one (both retryable).
    """
    try:
        cm = pooled(pool)
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
        _used[conn] = time.monotonic()
        await cm.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def pooled(pool: AsyncConnectionPool) -> AsyncIterator[psycopg.AsyncConnection]:
    """``pool.connection()``, except that a cancellation during the checkout is never lost.

    A caller waiting for a connection waits in psycopg_pool's ``WaitingClient.wait``, an
    ``asyncio.wait_for``; on Python 3.11 (the images' Python) that returns the result and drops
    the cancellation when the task is cancelled (job cancel, deadline) just as the connection
    is handed to it, so the cancelled task went on to run its statements (every time, tested).
    A cancellation counted during the checkout is honoured here instead: the connection goes
    back to the pool unused and ``CancelledError`` is raised.
    """
    before = cancellations()
    async with pool.connection() as conn:
        raise_if_cancelled_since(before)
        yield conn


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
        # One lock for every plugin: they share the aiwfe_migrations table, and a concurrent
        # CREATE TABLE IF NOT EXISTS is not race-free in PostgreSQL.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('aiwfe-migrate'))")
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
