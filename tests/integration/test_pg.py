"""aiwfe.kernel.pg: migrations of several plugins starting together on one schema."""

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
