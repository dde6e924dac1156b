"""A connected :class:`~aiwfe.bus._client.FastClient` for the bus client's own tests."""

from __future__ import annotations

from aiwfe.bus._client import FastClient


async def connect_fast(url: str) -> FastClient:
    """A FastClient connected to ``url`` with nats-py's defaults (the caller closes it)."""
    nc = FastClient()
    await nc.connect(servers=[url])
    return nc
