"""memory.recall with the semantic embedder, against a real PostgreSQL: a paraphrase that
shares no word with its memory is recalled, where hashing (and full text) miss it; the pod's
``/ready`` names the embedder memory and perception run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiwfe.bench._paraphrases import DISTRACTORS, PAIRS
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.memory.contract import Recall, Remember
from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable
from tests.support.pods import running

pytestmark = [pytest.mark.integration]

try:
    SemanticEmbedder()
    WHY_NOT = ""
except SemanticUnavailable as e:
    WHY_NOT = str(e)


@contextlib.asynccontextmanager
async def memory(
    prefix: str, pg_url: str, data_dir: Path, embedder: str, *, perception: bool = False
) -> AsyncIterator[PodRunner]:
    cfg = {"database_url": pg_url, "data_dir": str(data_dir), "collection": f"{prefix}-{embedder}", "vector_store": "memory"}
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**cfg, "embedder": embedder}.items())
    plugins, more = (
        ('"memory", "perception"', f'[plugins.perception]\nembedder = "{embedder}"\n') if perception else ('"memory"', "")
    )
    m = parse_manifest(
        f'[system]\nsubject_prefix = "{prefix}"\n[pods.mem]\nplugins = [{plugins}]\n[plugins.memory]\n{body}\n{more}', env={}
    )
    async with running(m) as pods:
        yield pods["mem"]


async def ready(pod: PodRunner) -> dict[str, object]:
    """The pod's ``/ready`` body, over HTTP from its ops endpoint."""

    def get() -> dict[str, object]:
        with urllib.request.urlopen(pod.ops.url + "/ready", timeout=5) as r:
            assert r.status == 200
            body: dict[str, object] = json.loads(r.read())
            return body

    return await asyncio.to_thread(get)


async def _hits(pod: PodRunner, owner: str) -> int:
    k = pod.kernel
    ids = [(await k.call(Remember(text=m, owner=owner))).id for m, _ in PAIRS]
    for d in DISTRACTORS:
        await k.call(Remember(text=d, owner=owner))
    found = 0
    for (_, query), want in zip(PAIRS, ids, strict=True):
        r = await k.call(Recall(query=query, owner=owner, k=5))
        found += want in [h.id for h in r.hits]
    return found


@pytest.mark.skipif(bool(WHY_NOT), reason=f"semantic embedder unavailable: {WHY_NOT}")
async def test_paraphrase_recall_semantic_vs_hashing(prefix: str, pg_url: str, tmp_path: Path) -> None:
    async with memory(prefix, pg_url, tmp_path, "semantic") as pod:
        assert pod.plugins["memory"].degraded() == []
        semantic = await _hits(pod, "s")
    async with memory(prefix, pg_url, tmp_path, "hashing") as pod:
        hashing = await _hits(pod, "h")
    assert semantic >= 0.8 * len(PAIRS), (semantic, hashing)
    assert semantic - hashing >= 0.4 * len(PAIRS), (semantic, hashing)


async def test_auto_without_the_model_notes_hashing(
    prefix: str, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIWFE_EMBED_MODEL_DIR", str(tmp_path / "nowhere"))
    async with memory(prefix, pg_url, tmp_path, "auto", perception=True) as pod:
        notes = pod.plugins["memory"].degraded()
        assert notes and notes[0].startswith("embedder hashing (semantic unavailable")
        body = await ready(pod)
        for plugin in ("memory", "perception"):
            embedder = body["plugins"][plugin]["embedder"]  # type: ignore[index]
            assert embedder.startswith("hashing (semantic unavailable") and "nowhere" in embedder, body
        r = await pod.kernel.call(Remember(text="hello there", owner="a"))
        assert r.id


@pytest.mark.skipif(bool(WHY_NOT), reason=f"semantic embedder unavailable: {WHY_NOT}")
async def test_ready_names_the_semantic_model(prefix: str, pg_url: str, tmp_path: Path) -> None:
    async with memory(prefix, pg_url, tmp_path, "auto", perception=True) as pod:
        body = await ready(pod)
        assert body["degraded"] == [], body
        want = SemanticEmbedder().description
        assert want.startswith("semantic all-MiniLM-L6-v2 ("), want
        assert body["plugins"] == {"memory": {"embedder": want}, "perception": {"embedder": want}}, body
        assert pod.status()["details"] == body["plugins"]


async def test_ready_names_hashing(prefix: str, pg_url: str, tmp_path: Path) -> None:
    async with memory(prefix, pg_url, tmp_path, "hashing", perception=True) as pod:
        body = await ready(pod)
        assert body["plugins"] == {"memory": {"embedder": "hashing"}, "perception": {"embedder": "hashing"}}, body
