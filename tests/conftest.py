"""Shared fixtures: real servers and isolated subject prefixes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.servers import nats_service, postgres_service, redis_service

# The project installs as one namespace (aiwfe.kernel, aiwfe.bus, aiwfe.plugins, aiwfe.bench).
# The checkout is on sys.path when pytest runs from it, so a stray `import kernel` would
# load a second copy of a module (and its metrics registry) from the folder: refuse it.
_FOLDERS = frozenset({"kernel", "bus", "plugins", "bench"})


class _NoTopLevelFolders:
    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name.partition(".")[0] in _FOLDERS:
            raise ImportError(f"import aiwfe.{name}, not {name}: the folders install under the aiwfe namespace")
        return None


sys.meta_path.insert(0, _NoTopLevelFolders)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with JetStream (see tests/support/servers.py for the choice)."""
    with nats_service(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL (see tests/support/servers.py for the choice)."""
    with postgres_service(tmp_path_factory.mktemp("pg")) as url:
        yield url


@pytest.fixture
async def pg_url(database_url: str, prefix: str) -> AsyncIterator[str]:
    """``database_url`` with a fresh schema of this test's own as its search_path (dropped after)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{prefix}"')
    params = conninfo_to_dict(database_url)
    params["options"] = (params.get("options", "") + f" -c search_path={prefix}").strip()
    yield make_conninfo(**params)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{prefix}" CASCADE')


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis-protocol server URL (see tests/support/servers.py for the choice)."""
    with redis_service(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def prefix() -> str:
    """A subject prefix of this test's own, so its streams never meet another test's."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
async def cleanup_streams(nats_url: str, prefix: str) -> AsyncIterator[None]:
    """Delete this test's streams and results bucket afterwards (shared servers stay clean)."""
    yield
    import nats

    from aiwfe.bus.codec import stream_names

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    names = stream_names(prefix)
    for stream in (names["jobs"], names["events"], names["dlq"], f"KV_{names['results']}"):
        try:
            await js.delete_stream(stream)
        except Exception:
            pass
    await nc.close()


async def wait_until(pred, timeout_s: float = 10.0, every_s: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``pred`` (sync or async) until true; False on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        r = pred()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return True
        await asyncio.sleep(every_s)
    return False


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
