"""Embedded PostgreSQL and Valkey (kernel/tools/embedded_db.py): start, connect, kill, restart in place."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis

from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres, EmbeddedValkey

pytestmark = pytest.mark.integration


def test_postgres_starts_survives_kill_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    pg = EmbeddedPostgres(tmp_path / "pg").start()
    try:
        assert pg.port not in (5432, 6379)
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (n int)")
            conn.execute("INSERT INTO kept VALUES (1), (2)")
        pg.kill()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.url, connect_timeout=1).close()
        port = pg.port
        pg = EmbeddedPostgres(tmp_path / "pg", port=port).start()  # same address, same data
        assert pg.port == port
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT sum(n) FROM kept").fetchone() == (3,)
    finally:
        pg.stop()
    assert pg.proc is not None and pg.proc.poll() is not None


def test_two_postgres_servers_side_by_side(tmp_path: Path) -> None:
    with EmbeddedPostgres(tmp_path / "a") as a, EmbeddedPostgres(tmp_path / "b") as b:
        assert a.port != b.port
        for srv in (a, b):
            with psycopg.connect(srv.url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_valkey_starts_kill_and_restart_on_the_same_port(tmp_path: Path) -> None:
    vk = EmbeddedValkey(tmp_path / "vk").start()
    try:
        assert vk.port not in (5432, 6379)
        assert vk.url == f"redis://127.0.0.1:{vk.port}/0"
        client = redis.Redis.from_url(vk.url, socket_timeout=1)
        client.set("k", "v")
        assert client.get("k") == b"v"
        vk.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        vk.start()
        assert client.ping() is True
        client.close()
    finally:
        vk.stop()


def test_standard_ports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="standard port"):
        EmbeddedPostgres(tmp_path, port=5432)
    with pytest.raises(ValueError, match="standard port"):
        EmbeddedValkey(tmp_path, port=6379)
