"""aiwfe.kernel.pg: migrations of several plugins starting together on one schema; the checkout check."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aiwfe.kernel import pg

pytestmark = [pytest.mark.integration]


async def test_plugins_migrating_at_once_share_the_table(pg_url: str, tmp_path: Path) -> None:
    folders = []
    for name in ("a", "b", "c", "d"):
        d = tmp_path / name
        d.mkdir()
        (d / "001_init.sql").write_text(f"CREATE TABLE t_{name} (x int)")
        folders.append((name, d))
    pools = [await pg.open_pool(pg_url, name=f"mig-{n}", max_size=2, timeout_s=5, max_waiting=10) for n, _ in folders]
    try:
        applied = await asyncio.gather(*(pg.migrate(pool, n, d) for pool, (n, d) in zip(pools, folders, strict=True)))
        assert applied == [["001_init.sql"]] * 4
        again = await asyncio.gather(*(pg.migrate(pool, n, d) for pool, (n, d) in zip(pools, folders, strict=True)))
        assert again == [[]] * 4
    finally:
        for pool in pools:
            await pool.close()


async def _backend_pid(pool: object) -> int:
    async with pg.connection(pool) as conn:  # type: ignore[arg-type]
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    assert row is not None
    return int(row[0])


async def _terminate(pg_url: str, pid: int) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as admin:
        await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def test_a_connection_idle_past_the_recent_window_is_pinged_and_a_dead_one_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "RECENT_S", 0.2)
    pool = await pg.open_pool(pg_url, name="chk-idle", max_size=1, timeout_s=5, max_waiting=10)
    try:
        pid = await _backend_pid(pool)
        await _terminate(pg_url, pid)  # the server drops the pool's only connection while it is idle
        await asyncio.sleep(0.3)
        assert await _backend_pid(pool) != pid  # the ping found it dead: the statement ran on a new one
    finally:
        await pool.close()


async def test_a_connection_used_moments_ago_is_not_pinged_so_its_loss_fails_one_statement_retryably(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trade-off the module docstring names: no ping within RECENT_S of a good use."""
    from aiwfe.kernel.errors import Unavailable

    monkeypatch.setattr(pg, "RECENT_S", 30.0)
    pool = await pg.open_pool(pg_url, name="chk-recent", max_size=1, timeout_s=5, max_waiting=10)
    try:
        pid = await _backend_pid(pool)
        async with pool.connection() as conn:  # taken without a ping: the same backend
            assert (await (await conn.execute("SELECT pg_backend_pid()")).fetchone()) == (pid,)
        await _terminate(pg_url, pid)
        await asyncio.sleep(0.1)
        with pytest.raises(Unavailable) as e:
            await _backend_pid(pool)
        assert e.value.retryable
        assert await _backend_pid(pool) != pid  # the broken one was discarded
    finally:
        await pool.close()
