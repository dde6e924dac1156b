"""Contracts of the learning plugin (msgspec and stdlib only).

Helios calls :class:`ExpertScores` once per request for all candidate experts and
weights their answers by ``scores``; clients send :class:`Feedback` on answers.
"""

from __future__ import annotations

from aiwfe.kernel.contract import Idempotent, Reply, Request

__all__ = ["ExpertScore", "ExpertScores", "ExpertScoresResult", "Feedback", "FeedbackResult"]


class FeedbackResult(Reply):
    """The stored feedback's id (the same id when a rater rates the same answer again)."""

    id: int


class Feedback(Request[FeedbackResult], tag="learning.feedback"):
    """A rating of ``expert``'s answer in ``job``: 1 (useless) to 5 (excellent).

    ``expertise``: the tags the answer was about (perception's); ``rater``: who rated (one
    rating per job, expert and rater; a new one replaces the old).
    """

    job: str
    expert: str
    rating: float
    comment: str = ""
    expertise: list[str] = []
    rater: str = ""


class ExpertScore(Reply):
    """One expert's quality: ``overall`` (0..1), ``count`` of ratings, their decayed ``weight``,
    and a score per expertise tag it was rated on."""

    overall: float
    count: int = 0
    weight: float = 0.0
    by_expertise: dict[str, float] = {}


class ExpertScoresResult(Reply):
    """``scores``: expert → quality 0..1 for the requested expertise (overall when none
    was requested); every requested expert is present, unrated ones at the prior.
    ``detail``: the same experts' :class:`ExpertScore` (only when asked for)."""

    scores: dict[str, float]
    detail: dict[str, ExpertScore] = {}


class ExpertScores(Request[ExpertScoresResult], Idempotent, tag="learning.expert_scores"):
    """Quality scores of ``experts``, for the request's ``expertise`` tags."""

    experts: list[str]
    expertise: list[str] = []
    detail: bool = False
