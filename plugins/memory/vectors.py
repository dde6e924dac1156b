"""Vector indexes behind the memory plugin.

* :class:`EdgeIndex` -- Qdrant's embedded engine (``qdrant-edge-py``), a shard under a
  data directory: the default when no Qdrant URL is configured. Measured here at 10,000 x
  384 with an owner filter: upserts ≈ 25 k/s, queries p50 ≈ 0.1 ms, against ≈ 60 ms for
  qdrant-client's pure-Python local mode.
* :class:`ClientIndex` -- ``qdrant_client.AsyncQdrantClient``: a Qdrant server at a URL
  (production), or qdrant-client's local mode (``location=":memory:"`` or a path).

Points carry the memory id, ``owner`` and the scalar metadata under ``meta.<key>``;
every search filters on ``owner``, so one owner's query never scores another's points.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, Protocol

from aiwfe.kernel.errors import ConfigError

__all__ = ["ClientIndex", "EdgeIndex", "VectorIndex", "payload_for"]

Scalar = str | int | float | bool


class VectorIndex(Protocol):
    """What the memory plugin needs of a vector store."""

    async def upsert(self, points: list[tuple[str, list[float], dict[str, Any]]]) -> None:
        """Insert or replace ``(id, vector, payload)`` points."""
        ...

    async def search(self, vector: list[float], owner: str, filters: dict[str, Scalar], limit: int) -> list[tuple[str, float]]:
        """Return up to ``limit`` ``(id, similarity)`` of ``owner``'s points, best first."""
        ...

    async def delete(self, ids: list[str]) -> None:
        """Delete points (missing ids are ignored)."""
        ...

    async def close(self) -> None:
        """Flush and release."""
        ...


def payload_for(owner: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """The payload stored with a point: owner plus the scalar metadata under ``meta``."""
    return {"owner": owner, "meta": {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool))}}


class EdgeIndex:
    """A qdrant-edge shard at ``path`` (created when absent). Calls run inline: they take microseconds."""

    def __init__(self, path: Path, dim: int) -> None:
        """Open (or create) the shard.

        Raises:
            ConfigError: another process holds the shard (one embedded store per replica).
        """
        import qdrant_edge as q

        self._q = q
        path.mkdir(parents=True, exist_ok=True)
        try:
            if any(path.iterdir()):
                self._shard = q.EdgeShard.load(str(path))
            else:
                cfg = q.EdgeConfig(vectors={"": q.EdgeVectorParams(size=dim, distance=q.Distance.Cosine)})
                self._shard = q.EdgeShard.create(str(path), cfg)
                self._shard.update(q.UpdateOperation.create_field_index("owner", q.PayloadSchemaType.Keyword))
        except Exception as e:
            if "WouldBlock" not in str(e):
                raise
            raise ConfigError(
                f"memory: the embedded vector store {path} is already open (another process or replica); "
                "an embedded store serves one replica: set QDRANT_URL for several, or give each its own data_dir or collection"
            ) from None

    async def upsert(self, points: list[tuple[str, list[float], dict[str, Any]]]) -> None:
        """See :class:`VectorIndex`."""
        q = self._q
        self._shard.update(q.UpdateOperation.upsert_points([q.Point(pid, {"": vec}, payload) for pid, vec, payload in points]))

    async def search(self, vector: list[float], owner: str, filters: dict[str, Scalar], limit: int) -> list[tuple[str, float]]:
        """See :class:`VectorIndex`."""
        q = self._q
        must = [q.FieldCondition(key="owner", match=q.MatchValue(owner))]
        must += [q.FieldCondition(key=f"meta.{k}", match=q.MatchValue(v)) for k, v in filters.items()]
        found = self._shard.query(q.QueryRequest(limit=limit, query=q.Query.Nearest(vector), filter=q.Filter(must=must)))
        return [(str(p.id), float(p.score)) for p in found]

    async def delete(self, ids: list[str]) -> None:
        """See :class:`VectorIndex`."""
        if ids:
            self._shard.update(self._q.UpdateOperation.delete_points(list(ids)))

    async def close(self) -> None:
        """Flush to disk and close the shard."""
        self._shard.flush()
        self._shard.close()


class ClientIndex:
    """A collection through ``AsyncQdrantClient`` (server URL, or local mode via ``location``/``path``)."""

    def __init__(
        self, collection: str, dim: int, *, url: str = "", location: str = "", path: str = "", api_key: str = ""
    ) -> None:
        from qdrant_client import AsyncQdrantClient

        self.collection = collection
        self.dim = dim
        if url:
            self._client = AsyncQdrantClient(url=url, api_key=api_key or None)
        elif path:
            self._client = AsyncQdrantClient(path=path)
        else:
            self._client = AsyncQdrantClient(location=location or ":memory:")
        self._remote = bool(url)

    async def open(self) -> ClientIndex:
        """Create the collection (and the owner index on a server) when missing."""
        from qdrant_client import models as m

        if not await self._client.collection_exists(self.collection):
            await self._client.create_collection(
                self.collection, vectors_config=m.VectorParams(size=self.dim, distance=m.Distance.COSINE)
            )
            if self._remote:
                await self._client.create_payload_index(self.collection, "owner", m.PayloadSchemaType.KEYWORD)
        return self

    async def upsert(self, points: list[tuple[str, list[float], dict[str, Any]]]) -> None:
        """See :class:`VectorIndex`."""
        from qdrant_client import models as m

        await self._client.upsert(
            self.collection, points=[m.PointStruct(id=pid, vector=vec, payload=pl) for pid, vec, pl in points], wait=True
        )

    async def search(self, vector: list[float], owner: str, filters: dict[str, Scalar], limit: int) -> list[tuple[str, float]]:
        """See :class:`VectorIndex`."""
        from qdrant_client import models as m

        must: list[Any] = [m.FieldCondition(key="owner", match=m.MatchValue(value=owner))]
        must += [m.FieldCondition(key=f"meta.{k}", match=m.MatchValue(value=v)) for k, v in filters.items()]  # type: ignore[arg-type]
        res = await self._client.query_points(self.collection, query=vector, query_filter=m.Filter(must=must), limit=limit)
        return [(str(uuid.UUID(str(p.id))), float(p.score)) for p in res.points]

    async def delete(self, ids: list[str]) -> None:
        """See :class:`VectorIndex`."""
        from qdrant_client import models as m

        if ids:
            await self._client.delete(self.collection, points_selector=m.PointIdsList(points=list(ids)), wait=True)  # type: ignore[arg-type]

    async def close(self) -> None:
        """Close the client."""
        await asyncio.shield(self._client.close())
