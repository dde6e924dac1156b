"""Contracts of the perception plugin (msgspec and stdlib only)."""

from __future__ import annotations

from aiwfe.kernel.contract import Idempotent, Reply, Request

__all__ = ["ExpertiseScore", "Perceive", "Perception"]


class ExpertiseScore(Reply):
    """One expertise tag and how strongly the text asks for it (0..1)."""

    tag: str
    score: float


class Perception(Reply):
    """What a request is about."""

    intent: str
    language: str
    entities: list[str] = []
    expertise: list[ExpertiseScore] = []


class Perceive(Request[Perception], Idempotent, tag="perception.perceive"):
    """Analyse ``text``; return at most ``max_tags`` expertise tags, best first."""

    text: str
    max_tags: int = 5
