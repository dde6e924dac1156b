"""reasoning plugin. Providers so far: ``extractive`` (DESIGN.md §4).

The extractive provider is not a language model: it ranks the sentences of the context
by word overlap with the task (and role) and returns the best ones in their original
order, deterministically. ``latency_s`` simulates a model's latency so that timing tests
are meaningful. ``ollama`` and ``openai`` providers arrive with the cognitive-plugins issue.
"""

from __future__ import annotations

import asyncio
import re
import time

import msgspec

from kernel import ConfigError, Plugin, serves

from .contract import Reason, Reasoned

__all__ = ["ReasoningPlugin", "extract"]

_SENT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"the", "a", "an", "and", "or", "of", "to", "in", "is", "are", "for", "on", "with", "it", "this", "that", "be", "as"}


class ReasoningPlugin(Plugin):
    """Serves ``reasoning.reason``."""

    name = "reasoning"

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """``provider``: ``extractive``; ``latency_s``: simulated latency per call;
        ``max_concurrency``: calls in flight per pod."""

        provider: str = "extractive"
        latency_s: float = 0.0
        max_concurrency: int = 64

    config: Config

    def __init__(self, config: Config, kernel: object) -> None:
        if config.provider != "extractive":
            raise ConfigError(f"reasoning: unknown provider {config.provider!r}; available: extractive")
        super().__init__(config, kernel)  # type: ignore[arg-type]

    @serves(Reason, concurrency=256, max_queue=4096)
    async def reason(self, req: Reason) -> Reasoned:
        """Answer with the extractive provider."""
        t0 = time.perf_counter()
        latency = self.config.latency_s if req.latency_s is None else req.latency_s
        if latency > 0:
            await asyncio.sleep(latency)
        answer, confidence = extract(req.role, req.task, req.context, req.max_sentences)
        prompt_tokens = sum(len(_WORD.findall(s.lower())) for s in [req.role, req.task, *req.context])
        return Reasoned(
            answer=answer,
            confidence=confidence,
            provider="extractive",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(_WORD.findall(answer.lower())),
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
        )


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def extract(role: str, task: str, context: list[str], max_sentences: int) -> tuple[str, float]:
    """Rank context sentences by overlap with task and role; return (answer, confidence)."""
    query = _terms(task) | _terms(role)
    sentences = [s.strip() for chunk in context for s in _SENT.split(chunk) if s.strip()]
    if not sentences or not query:
        return (f"[{role}] No context to answer: {task}", 0.0)
    scored = []
    for i, s in enumerate(sentences):
        terms = _terms(s)
        overlap = len(terms & query) / len(query)
        scored.append((overlap, -i, s))
    best = sorted(scored, reverse=True)[: max(1, max_sentences)]
    best = [b for b in best if b[0] > 0] or best[:1]
    chosen = sorted(best, key=lambda b: -b[1])
    confidence = round(sum(b[0] for b in chosen) / len(chosen), 4)
    return (" ".join(b[2] for b in chosen), confidence)
