"""Synthesis of the experts' answers (a pure function, shared by the plugin and its tests)."""

from __future__ import annotations

import re

from .contract import ExpertAnswer

__all__ = ["SENTENCE_BREAK", "synthesise"]

SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")


def synthesise(answers: list[ExpertAnswer], max_sentences: int) -> tuple[str, float]:
    """Combine answered experts: sentences from the heaviest answers first, deduplicated.

    An answer's weight is relevance × expert weight × max(confidence, 0.05); the
    synthesis confidence is the weight-averaged confidence. Returns (text, confidence).
    """
    ok = [a for a in answers if a.status == "answered"]
    if not ok:
        return "", 0.0
    weighted = sorted(ok, key=lambda a: (-(a.weight * max(a.confidence, 0.05)), a.expert))
    seen: set[str] = set()
    sentences: list[str] = []
    keep = max(1, max_sentences)
    for a in weighted:
        if len(sentences) >= keep:  # later sentences would be cut off anyway
            break
        for s in SENTENCE_BREAK.split(a.answer):
            norm = s.strip().lower()
            if norm and norm not in seen:
                seen.add(norm)
                sentences.append(s.strip())
    total = sum(a.weight * max(a.confidence, 0.05) for a in ok)
    confidence = sum(a.weight * max(a.confidence, 0.05) * a.confidence for a in ok) / total if total else 0.0
    return " ".join(sentences[:keep]), round(confidence, 4)
