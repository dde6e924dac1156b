"""Memory when its PostgreSQL is killed and restarted (a server of the test's own)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import Unavailable
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres
from aiwfe.plugins.memory.contract import Recall, Remember
from tests.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.fault]


async def test_postgres_restart_fails_fast_then_recovers(prefix: str, tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        text = (
            f'[system]\nsubject_prefix = "{prefix}"\ndrain_timeout_s = 2\n[pods.mem]\nplugins = ["memory"]\n'
            f"[plugins.memory]\ndatabase_url = {json.dumps(pg.url)}\ndata_dir = {json.dumps(str(tmp_path))}\n"
            "pool_max = 4\npool_timeout_s = 1.0\n"
        )
        async with PodRunner(parse_manifest(text, env={}), "mem", LocalBus(prefix), ops_port=0) as pod:
            k = pod.kernel
            kept = await k.call(Remember(text="Survives a database restart.", owner="alice"))

            pg.kill()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Unavailable, match="database unavailable"):
                await k.call(Recall(query="database restart", owner="alice"))
            assert loop.time() - t0 < 2.5  # at most about one pool timeout, never a hang
            with pytest.raises(Unavailable):
                await k.call(Remember(text="Written while the database is down.", owner="alice"))

            pg = EmbeddedPostgres(tmp_path / "pg", port=pg.port).start()
            t0 = loop.time()

            async def recall_works() -> bool:
                try:
                    return bool((await k.call(Recall(query="database restart", owner="alice"))).hits)
                except Unavailable:
                    return False

            assert await wait_until(recall_works, timeout_s=20, every_s=0.1), "memory did not recover"
            assert loop.time() - t0 < 10
            hits = (await k.call(Recall(query="database restart written while down", owner="alice", k=10))).hits
            assert [h.id for h in hits] == [kept.id]  # the failed write left nothing behind
    finally:
        pg.stop()
