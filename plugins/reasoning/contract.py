"""Contracts of the reasoning plugin (msgspec and stdlib only)."""

from __future__ import annotations

from kernel.contract import Reply, Request

__all__ = ["Reason", "Reasoned"]


class Reasoned(Reply):
    """An answer with its confidence (0..1), token counts and latency."""

    answer: str
    confidence: float
    provider: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0


class Reason(Request[Reasoned], tag="reasoning.reason"):
    """Answer ``task`` in the voice of ``role`` from ``context``.

    ``latency_s`` (extractive provider only) overrides the configured simulated latency.
    """

    role: str
    task: str
    context: list[str] = []
    max_sentences: int = 3
    latency_s: float | None = None
