"""``aiwfe bench memory``: hybrid recall through the kernel against the stores alone.

Remembers ``--memories`` (default 10,000) synthetic memories spread over ten owners,
through the kernel (a client pod calling the memory pod over NATS), and reports
``ingest_per_s``. Then recalls at 1, 10 and 50 in flight, alternating with the baseline
in the same run:

* **kernel** -- ``memory.recall`` from a client pod over NATS (``recall_*``), and from
  inside the memory pod (``local_*``);
* **baseline** -- the same work without the kernel: the same query embedding, the same
  vector search straight to the vector store (the qdrant-edge shard, or qdrant-client
  when ``QDRANT_URL`` is set), and the same full-text SQL straight to PostgreSQL through a
  psycopg pool of the same size.

PostgreSQL comes from ``--database-url`` (default ``DATABASE_URL``, else
``postgresql://postgres@127.0.0.1:5432/test``), in a schema of the run's own, dropped
after. The last line is one JSON object; its top-level figures are at 10 in flight,
``overhead_pct`` = kernel p50 over NATS / baseline p50 - 1. For the record it also times
the vector search alone, one at a time, in the plugin's store (``store_search_p50_ms``)
and in qdrant-client's local mode on the same data (``qdrant_client_local_*``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._support import emit, nats_server, percentile

DEFAULT_DB = "postgresql://postgres@127.0.0.1:5432/test"
OWNERS = [f"owner{i}" for i in range(10)]
ROUND = 100  # recalls per path before switching to the next path


def corpus(n: int, seed: int = 7) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``n`` synthetic memories ``(owner, text)`` and 4,000 queries, deterministic."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "va", "gu", "xe", "zo", "bi", "fa", "he"]
    vocab = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(2, 4))) for _ in range(6000)})
    weights = [1.0 / (i + 1) ** 0.8 for i in range(len(vocab))]  # Zipf-like: some words are common
    memories = [(OWNERS[i % len(OWNERS)], " ".join(rng.choices(vocab, weights, k=rng.randint(8, 24))) + ".") for i in range(n)]
    queries = []
    for _ in range(4000):
        owner, text = rng.choice(memories)
        words = text.rstrip(".").split()
        queries.append((owner, " ".join(rng.sample(words, k=min(3, len(words))))))
    return memories, queries


async def _measure(fn: Callable[[str, str], Awaitable[Any]], queries: list[tuple[str, str]], inflight: int) -> list[float]:
    """Run ``queries`` with ``inflight`` workers; return each call's latency in ms."""
    it = iter(queries)
    samples: list[float] = []

    async def worker() -> None:
        for owner, q in it:
            t0 = time.perf_counter()
            await fn(owner, q)
            samples.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(inflight)))
    return samples


async def _vector_stores(plugin: Any, memories: list[tuple[str, str]], queries: list[tuple[str, str]]) -> dict[str, Any]:
    """The vector search alone: the plugin's store against qdrant-client's local mode, same data."""
    from aiwfe.plugins.memory.vectors import ClientIndex, payload_for

    emb = plugin.embedder
    local = await ClientIndex("bench", plugin.config.embed_dim, location=":memory:").open()
    t0 = time.perf_counter()
    for i in range(0, len(memories), 500):
        chunk = memories[i : i + 500]
        vecs = await emb.embed([t for _, t in chunk])
        await local.upsert([(str(uuid.uuid4()), v, payload_for(o, {})) for (o, _), v in zip(chunk, vecs, strict=True)])
    upsert_s = time.perf_counter() - t0
    sample = queries[:200]
    qv = [(o, (await emb.embed([q]))[0]) for o, q in sample]
    out: dict[str, Any] = {"qdrant_client_local_upsert_per_s": round(len(memories) / upsert_s)}
    for name, index in (("store_search_p50_ms", plugin.index), ("qdrant_client_local_search_p50_ms", local)):
        lat = []
        for o, v in qv:
            t1 = time.perf_counter()
            await index.search(v, o, {}, 20)
            lat.append((time.perf_counter() - t1) * 1000)
        out[name] = round(percentile(lat, 50), 3)
    await local.close()
    return out


async def run(
    nats_url: str, db_url: str, n: int, levels: list[int], per_level: int, k: int, client_local: bool = True
) -> dict[str, Any]:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg.types.json import Jsonb

    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel import pg
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner
    from aiwfe.plugins.memory.contract import Recall, Remember
    from aiwfe.plugins.memory.plugin import _RECALL_SQL, MemoryPlugin

    schema = f"bench_memory_{os.getpid()}_{int(time.time())}"
    prefix = f"benchmem{int(time.time() * 1000) % 10**8}"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    params = conninfo_to_dict(db_url)
    params["options"] = (str(params.get("options", "")) + f" -c search_path={schema}").strip()
    url = make_conninfo("", **params)
    data_dir = tempfile.mkdtemp(prefix="aiwfe-bench-memory-")
    memories, queries = corpus(n)
    text = f"""
        [system]
        subject_prefix = "{prefix}"
        [pods.memory]
        plugins = ["memory"]
        [pods.client]
        plugins = []
        [plugins.memory]
        database_url = {json.dumps(url)}
        data_dir = {json.dumps(data_dir)}
        collection = "bench"
        """
    manifest = parse_manifest(text, env={"QDRANT_URL": os.environ.get("QDRANT_URL", "")})
    server = PodRunner(manifest, "memory", NatsBus(nats_url, prefix, name="memory"), ops_port=0)
    client = PodRunner(manifest, "client", NatsBus(nats_url, prefix, name="client"), ops_port=0)
    out: dict[str, Any] = {}
    try:
        await server.start()
        await client.start()
        plugin = server.plugins["memory"]
        assert isinstance(plugin, MemoryPlugin)
        remote, local = client.kernel, server.kernel

        # ingest through the kernel, 64 in flight
        it = iter(memories)

        async def ingest() -> None:
            for owner, t in it:
                await remote.call(Remember(text=t, owner=owner), timeout_s=30)

        t0 = time.perf_counter()
        await asyncio.gather(*(ingest() for _ in range(64)))
        ingest_s = time.perf_counter() - t0

        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ANALYZE memories")  # what autovacuum would do after a bulk load
        cfg = plugin.config
        base_pool = await pg.open_pool(url, name="bench-baseline", max_size=cfg.pool_max, timeout_s=5.0, max_waiting=1024)
        n_cand = max(4 * k, 20)

        async def baseline(owner: str, q: str) -> Any:
            (vector,) = await plugin.embedder.embed([q])
            vhits = await plugin.index.search(vector, owner, {}, n_cand)
            async with base_pool.connection() as conn:
                cur = await conn.execute(
                    _RECALL_SQL, {"query": q, "owner": owner, "filters": Jsonb({}), "n": n_cand, "vids": [h[0] for h in vhits]}
                )
                return await cur.fetchall()

        async def via_nats(owner: str, q: str) -> Any:
            return await remote.call(Recall(query=q, owner=owner, k=k), timeout_s=30)

        async def in_pod(owner: str, q: str) -> Any:
            return await local.call(Recall(query=q, owner=owner, k=k), timeout_s=30)

        hits = (await via_nats(*queries[0])).hits
        assert hits, "recall found nothing"
        for fn in (baseline, via_nats, in_pod):  # warm-up: pools, plans, caches
            await _measure(fn, queries[:300], 10)
        by_level: dict[str, Any] = {}
        for level in levels:
            kernel_s: list[float] = []
            local_s: list[float] = []
            base_s: list[float] = []
            rounds = max(1, per_level // ROUND)
            for r in range(rounds):  # short alternating rounds: load bursts hit all three alike
                chunk = [queries[(r * ROUND + i) % len(queries)] for i in range(ROUND)]
                base_s += await _measure(baseline, chunk, level)
                kernel_s += await _measure(via_nats, chunk, level)
                local_s += await _measure(in_pod, chunk, level)
            b50 = percentile(base_s, 50)
            by_level[str(level)] = {
                "recall_p50_ms": round(percentile(kernel_s, 50), 3),
                "recall_p99_ms": round(percentile(kernel_s, 99), 3),
                "local_p50_ms": round(percentile(local_s, 50), 3),
                "baseline_p50_ms": round(b50, 3),
                "baseline_p99_ms": round(percentile(base_s, 99), 3),
                "overhead_pct": round((percentile(kernel_s, 50) / b50 - 1) * 100, 1),
                "local_overhead_pct": round((percentile(local_s, 50) / b50 - 1) * 100, 1),
            }
        await base_pool.close()
        vectors_out: dict[str, Any] = {}
        if client_local:
            vectors_out = await _vector_stores(plugin, memories, queries)
        main_level = by_level.get("10") or next(iter(by_level.values()))
        out = {
            "memories": n,
            "ingest_per_s": round(n / ingest_s),
            "recall_p50_ms": main_level["recall_p50_ms"],
            "recall_p99_ms": main_level["recall_p99_ms"],
            "baseline_p50_ms": main_level["baseline_p50_ms"],
            "overhead_pct": main_level["overhead_pct"],
            "local_overhead_pct": main_level["local_overhead_pct"],
            "vector_store": type(plugin.index).__name__,
            "k": k,
            "inflight": by_level,
            **vectors_out,
        }
    finally:
        with contextlib.suppress(Exception):
            await client.stop()
        with contextlib.suppress(Exception):
            await server.stop()
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(data_dir, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL") or DEFAULT_DB, help=f"PostgreSQL (default {DEFAULT_DB})"
    )
    p.add_argument("--memories", type=int, default=10_000, help="memories to remember (default 10000)")
    p.add_argument("--inflight", default="1,10,50", help="recall concurrency levels (default 1,10,50)")
    p.add_argument("--queries", type=int, default=2000, help="recalls per level and path (default 2000)")
    p.add_argument("--k", type=int, default=5, help="hits per recall (default 5)")
    p.add_argument("--no-client-local", action="store_true", help="skip the vector search in qdrant-client's local mode")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.inflight.split(",") if x.strip()]
    with nats_server(a.url) as url:
        result = asyncio.run(run(url, a.database_url, a.memories, levels, a.queries, a.k, not a.no_client_local))
    emit(result)
    return 0
