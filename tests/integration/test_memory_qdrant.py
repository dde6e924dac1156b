"""The memory plugin on the ``qdrant_url`` fixture under two placements (aiwfe.testing).

With a Qdrant server — ``QDRANT_URL``, or a Qdrant container under ``--aiwfe-servers=containers``
when a Docker engine answers — the vectors must land in that server's collection; without one
(``qdrant_url`` is ``""``) they live in the embedded store and the same body runs. This machine has
neither Docker nor a Qdrant server: here it runs the embedded path only.
"""

from __future__ import annotations

import pytest

from aiwfe.plugins.memory.contract import Recall, Remember
from aiwfe.testing import System

pytestmark = [pytest.mark.integration]


@pytest.mark.timeout(120)
@pytest.mark.aiwfe_placements(
    "monolith",
    "per_plugin",
    plugins=["memory"],
    config={"memory": {"data_dir": "${AIWFE_DATA_DIR}", "collection": "${AIWFE_PREFIX}-memories"}},
    services=["postgres", "qdrant"],
)
async def test_memory_on_the_qdrant_fixture(aiwfe_system: System, qdrant_url: str) -> None:
    s = aiwfe_system
    await s.call(Remember(text="The staging database runs PostgreSQL 16.", owner="ann"))
    await s.call(Remember(text="Lunch is at noon.", owner="ann"))
    hits = (await s.call(Recall(query="which database version", owner="ann"))).hits
    assert hits[0].text == "The staging database runs PostgreSQL 16."
    s.record("hits", [h.text for h in hits])
    if not qdrant_url:
        return  # the embedded vector store served (no QDRANT_URL, no Docker engine)
    from qdrant_client import AsyncQdrantClient

    client = AsyncQdrantClient(url=qdrant_url)
    try:
        assert (await client.count(f"{s.prefix}-memories")).count == 2
    finally:
        await client.close()
