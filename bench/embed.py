"""``aiwfe bench embed``: the semantic embedder against hashing, on this machine.

* **recall** -- every memory of :mod:`._paraphrases` (30 memories, 30 distractors) is
  embedded; each paraphrase query (sharing no word with its memory) is embedded and the
  memories ranked by cosine, as the vector index does. ``*_hit_at_5`` / ``*_hit_at_1``:
  the share of queries whose memory is among the first 5 / first.
* **speed** -- ``*_per_s``: embeddings per second for ``--sentences`` texts embedded in
  batches of ``--batch`` (best of ``--rounds``); ``semantic_one_p50_ms``: one text at a
  time, as one ``memory.remember`` embeds; ``*_concurrent_per_s``: every text as its own call,
  all at once (concurrent requests, which the semantic embedder batches together).

The semantic figures are null (``semantic_available`` false, with ``semantic_reason``)
where the semantic embedder cannot run. The last line is one JSON object. ``--url`` is
accepted and ignored (no server is used).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from ._paraphrases import DISTRACTORS, PAIRS, shared_words
from ._support import emit, percentile


def _recall(vectors: list[list[float]], queries: list[list[float]]) -> tuple[float, float]:
    """hit@5 and hit@1 where query i's memory is vector i."""
    hit5 = hit1 = 0
    for i, q in enumerate(queries):
        scores = sorted(((sum(a * b for a, b in zip(q, v, strict=True)), j) for j, v in enumerate(vectors)), reverse=True)
        top = [j for _, j in scores[:5]]
        hit5 += i in top
        hit1 += top[0] == i
    return round(hit5 / len(queries), 4), round(hit1 / len(queries), 4)


async def _measure(embedder: Any, sentences: int, batch: int, rounds: int) -> dict[str, float]:
    memories = [m for m, _ in PAIRS] + DISTRACTORS
    vectors = await embedder.embed(memories)
    queries = await embedder.embed([q for _, q in PAIRS])
    hit5, hit1 = _recall(vectors, queries)
    texts = [memories[i % len(memories)] + f" ({i})" for i in range(sentences)]
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for start in range(0, len(texts), batch):
            await embedder.embed(texts[start : start + batch])
        best = max(best, len(texts) / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    await asyncio.gather(*(embedder.embed([t]) for t in texts))
    concurrent = len(texts) / (time.perf_counter() - t0)
    one = []
    for t in texts[: min(len(texts), 50)]:
        t0 = time.perf_counter()
        await embedder.embed([t])
        one.append((time.perf_counter() - t0) * 1000)
    return {
        "hit_at_5": hit5,
        "hit_at_1": hit1,
        "per_s": round(best, 1),
        "concurrent_per_s": round(concurrent, 1),
        "one_p50_ms": round(percentile(one, 50), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from aiwfe.plugins.memory.embed import HashingEmbedder
    from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable

    overlap = [(m, q) for m, q in PAIRS if shared_words(m, q)]
    assert not overlap, f"paraphrase pairs sharing words: {overlap}"
    result: dict[str, Any] = {"pairs": len(PAIRS), "corpus": len(PAIRS) + len(DISTRACTORS), "cpus": os.cpu_count()}
    hashing = await _measure(HashingEmbedder(384), args.sentences, args.batch, args.rounds)
    result.update({f"hashing_{k}": v for k, v in hashing.items()})
    try:
        semantic = SemanticEmbedder(args.model_dir)
    except SemanticUnavailable as e:
        result.update(semantic_available=False, semantic_reason=str(e), model="")
        result.update({f"semantic_{k}": None for k in hashing})
    else:
        figures = await _measure(semantic, args.sentences, args.batch, args.rounds)
        result.update(semantic_available=True, semantic_reason="", model=semantic.model.name, threads=semantic.model.threads)
        result.update({f"semantic_{k}": v for k, v in figures.items()})
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sentences", type=int, default=1024, help="texts embedded for the speed figure (default 1024)")
    p.add_argument("--batch", type=int, default=64, help="texts per embed call for the speed figure (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds, best kept (default 3)")
    p.add_argument("--model-dir", default="", help="the semantic model's directory (default: as the memory plugin finds it)")
    p.add_argument("--url", help="ignored (no server is used)")
    args = p.parse_args(argv)
    emit(asyncio.run(run(args)))
    return 0
