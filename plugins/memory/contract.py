"""Contracts of the memory plugin (msgspec and stdlib only).

Helios calls :class:`Recall` once per request and shares the hits among its experts.
"""

from __future__ import annotations

from typing import Any

from aiwfe.kernel.contract import Idempotent, Reply, Request

__all__ = ["Forget", "ForgetResult", "MemoryHit", "Recall", "RecallResult", "Remember", "RememberResult"]


class RememberResult(Reply):
    """The stored memory's id."""

    id: str


class Remember(Request[RememberResult], tag="memory.remember"):
    """Store ``text`` for ``owner``. ``metadata`` is any JSON object; its scalar values can be
    used as Recall ``filters``. ``id`` (a UUID) makes the call idempotent: the same id stores once.
    """

    text: str
    owner: str
    metadata: dict[str, Any] = {}
    id: str = ""


class MemoryHit(Reply):
    """One recalled memory.

    ``score`` is the reciprocal-rank-fusion score; ``found_by`` lists the indexes that found
    it (``"text"``: PostgreSQL full text, ``"vector"``: Qdrant); ``text_rank`` and
    ``vector_rank`` are its 1-based ranks there (0 = not found there); ``similarity`` is the
    cosine similarity when the vector index found it.
    """

    id: str
    text: str
    score: float
    found_by: list[str]
    metadata: dict[str, Any] = {}
    text_rank: int = 0
    vector_rank: int = 0
    similarity: float = 0.0
    created_at: str = ""


class RecallResult(Reply):
    """Hits best first (at most ``k``) and the time the recall took inside the plugin."""

    hits: list[MemoryHit]
    took_ms: float = 0.0


class Recall(Request[RecallResult], Idempotent, tag="memory.recall"):
    """Find ``owner``'s memories closest to ``query``: full text and vectors, fused.

    ``filters`` match metadata values exactly (all must match). Never returns another
    owner's memory.
    """

    query: str
    owner: str
    k: int = 5
    filters: dict[str, str | int | float | bool] = {}


class ForgetResult(Reply):
    """``forgotten`` is False when no memory of that owner had that id."""

    forgotten: bool


class Forget(Request[ForgetResult], tag="memory.forget"):
    """Delete memory ``id`` of ``owner`` from both stores."""

    id: str
    owner: str
