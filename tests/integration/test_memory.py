"""The memory plugin against a real PostgreSQL, on LocalBus and over a real NATS server.

Vectors live in qdrant-edge (the embedded default) or in qdrant-client's local mode (the
code path of a Qdrant server); the tests run under both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import ConfigError, Overloaded, RemoteError, pg
from aiwfe.kernel.errors import BadInput
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.memory.contract import Forget, Recall, Remember
from aiwfe.plugins.memory.embed import HashingEmbedder
from aiwfe.plugins.memory.plugin import MemoryPlugin
from aiwfe.plugins.memory.vectors import payload_for
from tests.support.llm_servers import FakeLLMServer
from tests.support.pods import running

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
DOCS = {
    "alice": [
        ("An index makes a PostgreSQL query fast.", {"topic": "database"}),
        ("Vacuum the PostgreSQL table often to keep it small.", {"topic": "database"}),
        ("Kubernetes restarts a pod that fails its liveness probe.", {"topic": "devops"}),
        ("Cats sleep for most of the day.", {"topic": "pets"}),
    ],
    "bob": [
        ("Bob's secret: the PostgreSQL password is hunter2.", {"topic": "database"}),
        ("Bob keeps an index of his records.", {"topic": "music"}),
    ],
}

Start = Callable[..., contextlib.AbstractAsyncContextManager[dict[str, PodRunner]]]


def memory_manifest(prefix: str, pg_url: str, data_dir: Path, store: str, *, split: bool, **extra: Any) -> str:
    cfg = {
        "database_url": pg_url,
        "data_dir": str(data_dir),
        "collection": prefix,
        "vector_store": store,
        "reconcile_grace_s": 0.0,
        **extra,
    }
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
    pods = '[pods.mem]\nplugins = ["memory"]\n[pods.client]\nplugins = []\n' if split else '[pods.mem]\nplugins = ["memory"]\n'
    return f'[system]\nsubject_prefix = "{prefix}"\ndrain_timeout_s = 2\n{pods}[plugins.memory]\n{body}\n'


@pytest.fixture(params=["edge", "memory"])
def store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start(prefix: str, pg_url: str, tmp_path: Path, store: str) -> Start:
    """Start the memory pod (and a client pod when split) on one LocalBus."""

    @contextlib.asynccontextmanager
    async def run(*, split: bool = False, **extra: Any) -> AsyncIterator[dict[str, PodRunner]]:
        m = parse_manifest(memory_manifest(prefix, pg_url, tmp_path, store, split=split, **extra), env={})
        async with running(m) as pods:
            yield pods

    return run


async def seed(k: Any) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for owner, docs in DOCS.items():
        for text, meta in docs:
            r = await k.call(Remember(text=text, owner=owner, metadata=meta))
            ids.setdefault(owner, []).append(r.id)
    return ids


async def test_recall_fuses_full_text_and_vectors(start: Start) -> None:
    async with start() as pods:
        k = pods["mem"].kernel
        ids = await seed(k)
        r = await k.call(Recall(query="how to make a postgresql query fast", owner="alice", k=3))
        assert r.hits[0].id == ids["alice"][0]
        top = r.hits[0]
        assert top.found_by == ["text", "vector"] and top.text_rank == 1 and top.vector_rank == 1
        assert top.metadata == {"topic": "database"} and top.similarity > 0
        assert all(h.score > 0 for h in r.hits) and [h.score for h in r.hits] == sorted((h.score for h in r.hits), reverse=True)
        # a word only the vector side can match (character trigrams): "postgres" vs "PostgreSQL"
        v = await k.call(Recall(query="postgresq", owner="alice", k=2))
        assert v.hits and all(h.found_by == ["vector"] for h in v.hits)


async def test_owners_are_isolated(start: Start) -> None:
    async with start() as pods:
        k = pods["mem"].kernel
        ids = await seed(k)
        for query in ["postgresql password hunter2", "index records", "Bob's secret"]:
            r = await k.call(Recall(query=query, owner="alice", k=50))
            assert {h.id for h in r.hits} <= set(ids["alice"])
        r = await k.call(Recall(query="postgresql", owner="carol", k=5))
        assert r.hits == []
        assert (await k.call(Forget(id=ids["bob"][0], owner="alice"))).forgotten is False
        r = await k.call(Recall(query="hunter2 password", owner="bob", k=1))
        assert r.hits[0].id == ids["bob"][0]


async def test_filters_forget_and_idempotent_ids(start: Start) -> None:
    async with start(split=True) as pods:
        k = pods["client"].kernel  # a client pod: the remote path of LocalBus
        ids = await seed(pods["mem"].kernel)
        r = await k.call(Recall(query="postgresql", owner="alice", k=5, filters={"topic": "devops"}))
        assert [h.id for h in r.hits] == [ids["alice"][2]]
        fixed = str(uuid.uuid4())
        a = await k.call(Remember(text="Idempotent memory about Redis.", owner="alice", id=fixed))
        b = await k.call(Remember(text="Idempotent memory about Redis.", owner="alice", id=fixed))
        assert a.id == b.id == fixed
        # The same id for another memory (another owner's, or other text) was answered "stored" and stored nothing.
        for other in (
            Remember(text="Idempotent memory about Redis.", owner="bob", id=fixed),
            Remember(text="Other.", owner="alice", id=fixed),
        ):
            with pytest.raises(BadInput, match="already holds another memory"):
                await k.call(other)
        assert (await k.call(Forget(id=fixed, owner="alice"))).forgotten
        assert not (await k.call(Forget(id=fixed, owner="alice"))).forgotten
        plugin = pods["mem"].plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        vec = HashingEmbedder(384).embed_one("Idempotent memory about Redis.")
        assert fixed not in [pid for pid, _ in await plugin.index.search(vec, "alice", {}, 50)]
        async with pg.connection(plugin.pool) as conn:
            cur = await conn.execute("SELECT count(*) FROM memories WHERE id = %s", (fixed,))
            assert (await cur.fetchone()) == (0,)
        r = await k.call(Recall(query="Redis", owner="alice", k=5))
        assert fixed not in [h.id for h in r.hits]


async def test_input_neither_index_can_take_is_bad_input_for_any_caller(start: Start) -> None:
    """A filter key with a dot is a nested field to Qdrant and a top-level key to PostgreSQL;
    PostgreSQL text cannot hold NUL. Refused as BadInput (before: ValueError or DataError)."""
    async with start(split=True) as pods:
        k = pods["client"].kernel
        for key in ("a.b", "a'; drop", "", "k" * 65):
            with pytest.raises(BadInput, match="filters: key"):
                await k.call(Recall(query="q", owner="alice", filters={key: "x"}))
        with pytest.raises(BadInput, match="query must not contain NUL"):
            await k.call(Recall(query="a\x00", owner="alice"))
        for bad in (Remember(text="a\x00b", owner="alice"), Remember(text="ab", owner="alice", metadata={"k": [{"\x00": 1}]})):
            with pytest.raises(BadInput, match="must not contain NUL"):
                await k.call(bad)
        with pytest.raises(BadInput, match="must not be empty"):
            await k.call(Remember(text="  ", owner="alice"))
        ok = await k.call(Remember(text="a literal \\u0000 is text", owner="alice", metadata={"k_1-x": "v"}))
        r = await k.call(Recall(query="literal", owner="alice", filters={"k_1-x": "v"}))
        assert [h.id for h in r.hits] == [ok.id]


async def test_pool_exhaustion_answers_overloaded(start: Start) -> None:
    async with start(pool_max=1, pool_timeout_s=0.1, pool_max_waiting=1) as pods:
        k = pods["mem"].kernel
        plugin = pods["mem"].plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        async with plugin.pool.connection():
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(Overloaded):
                await k.call(Recall(query="anything", owner="alice"))
            assert loop.time() - t0 < 1.0
        assert (await k.call(Recall(query="anything", owner="alice"))).hits == []


async def test_unfinished_writes_are_repaired_at_start(start: Start, store: str) -> None:
    if store == "memory":
        pytest.skip("qdrant-client's :memory: mode does not survive a restart")
    emb = HashingEmbedder(384)
    async with start() as pods:
        plugin = pods["mem"].plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        kept = await pods["mem"].kernel.call(Remember(text="A finished memory about Redis.", owner="alice"))
        # what a crash leaves: a row written but its vector not (state 0) ...
        pending = str(uuid.uuid4())
        # ... and a memory whose forget stopped after the first step (state 2, vector still there)
        forgetting = str(uuid.uuid4())
        async with pg.connection(plugin.pool) as conn:
            await conn.execute(
                "INSERT INTO memories (id, owner, text, state) VALUES (%s, 'alice', 'Crash-time memory about Redis.', 0),"
                " (%s, 'alice', 'Half-forgotten memory about Redis.', 2)",
                (pending, forgetting),
            )
        await plugin.index.upsert([(forgetting, emb.embed_one("Half-forgotten memory about Redis."), payload_for("alice", {}))])
        r = await pods["mem"].kernel.call(Recall(query="memory about Redis", owner="alice", k=10))
        assert [h.id for h in r.hits] == [kept.id]  # neither unfinished memory is visible
    async with start() as pods:  # restart: the reconciler finishes both
        plugin = pods["mem"].plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        r = await pods["mem"].kernel.call(Recall(query="memory about Redis", owner="alice", k=10))
        assert {h.id for h in r.hits} == {kept.id, pending}
        assert all(h.found_by == ["text", "vector"] for h in r.hits)
        found = [pid for pid, _ in await plugin.index.search(emb.embed_one("Half-forgotten memory"), "alice", {}, 50)]
        assert forgetting not in found
        async with pg.connection(plugin.pool) as conn:
            cur = await conn.execute("SELECT id::text, state FROM memories ORDER BY id")
            assert sorted(await cur.fetchall()) == sorted([(kept.id, 1), (pending, 1)])


async def test_process_killed_between_the_writes(pg_url: str, prefix: str, tmp_path: Path) -> None:
    """A real crash: the writer process dies (os._exit) after the row, before the vector."""
    manifest = tmp_path / "m.toml"
    manifest.write_text(memory_manifest(prefix, pg_url, tmp_path, "edge", split=False))
    script = textwrap.dedent(
        f"""
        import asyncio, os
        from aiwfe.bus.local import LocalBus
        from aiwfe.kernel.manifest import load_manifest
        from aiwfe.kernel.pod import PodRunner
        from aiwfe.plugins.memory.contract import Remember

        async def main():
            m = load_manifest({str(manifest)!r})
            async with PodRunner(m, "mem", LocalBus({prefix!r}), ops_port=0) as pod:
                plugin = pod.plugins["memory"]
                async def die(points):
                    os._exit(9)
                plugin.index.upsert = die
                await pod.kernel.call(Remember(text="Written just before the crash, about Redis.", owner="alice"))

        asyncio.run(main())
        """
    )
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 9, proc.stderr
    m = parse_manifest(manifest.read_text(), env={})
    async with PodRunner(m, "mem", LocalBus(prefix), ops_port=0) as pod:
        r = await pod.kernel.call(Recall(query="crash Redis", owner="alice", k=5))
        assert len(r.hits) == 1 and r.hits[0].found_by == ["text", "vector"]


@pytest.mark.usefixtures("cleanup_streams")
async def test_over_nats(prefix: str, pg_url: str, tmp_path: Path, nats_url: str) -> None:
    m = parse_manifest(memory_manifest(prefix, pg_url, tmp_path, "edge", split=True), env={})
    async with running(m, nats_url=nats_url) as pods:
        k = pods["client"].kernel
        ids = await seed(k)
        results = await asyncio.gather(*(k.call(Recall(query="postgresql query fast", owner="alice", k=2)) for _ in range(20)))
        assert all(r.hits[0].id == ids["alice"][0] for r in results)
        r = await k.call(Recall(query="postgresql", owner="bob", k=10))
        assert {h.id for h in r.hits} <= set(ids["bob"])


async def test_failed_vector_write_leaves_neither(start: Start) -> None:
    async with start() as pods:
        plugin = pods["mem"].plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        real = plugin.index.upsert

        async def broken(points: Any) -> None:
            raise ConnectionError("qdrant is down")

        plugin.index.upsert = broken  # type: ignore[method-assign]
        with pytest.raises(RemoteError) as e:
            await pods["mem"].kernel.call(Remember(text="Lost memory about Redis.", owner="alice"))
        assert e.value.type == "ConnectionError"
        plugin.index.upsert = real  # type: ignore[method-assign]
        async with pg.connection(plugin.pool) as conn:
            cur = await conn.execute("SELECT count(*) FROM memories")
            assert await cur.fetchone() == (0,)


async def test_embedded_store_serves_one_replica(start: Start, store: str) -> None:
    if store != "edge":
        pytest.skip("only the embedded edge store is single-process")
    async with start():
        with pytest.raises(ConfigError, match="already open"):
            async with start():
                pass


@pytest.mark.parametrize("api", ["ollama", "openai"])
async def test_http_embedder_batches_concurrent_calls(start: Start, api: str) -> None:
    async with FakeLLMServer(chunk_delay_s=0) as srv, start(embedder=api, embed_url=srv.url, embed_model="e") as pods:
        k = pods["mem"].kernel
        ids = await asyncio.gather(*(k.call(Remember(text=f"note {i} about PostgreSQL", owner="alice")) for i in range(40)))
        embeds = [body for path, body in srv.requests if path.endswith(("/embed", "/embeddings"))]
        assert sum(len(b["input"]) for b in embeds) == 40 and len(embeds) < 40
        r = await k.call(Recall(query="note 7 about PostgreSQL", owner="alice", k=3))
        assert r.hits[0].id == ids[7].id and r.hits[0].found_by == ["text", "vector"]
