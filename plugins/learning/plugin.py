"""learning plugin: feedback in PostgreSQL, Bayesian-average quality scores with decay.

A rating r in 1..5 counts as ``(r - 1) / 4`` with weight ``0.5 ** (age / half_life)``.
An expert's overall score is the Bayesian average
``(prior_mean * prior_weight + Σ w·r) / (prior_weight + Σ w)``: few or old ratings stay
near the prior, many recent ones dominate it. A score for some expertise tags shrinks the
ratings on those tags toward the expert's overall score the same way, so an expert new to
a topic starts from its general quality. One SQL statement computes everything for a
request; results are cached for ``cache_ttl_s`` (cleared by feedback received here).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
from psycopg_pool import AsyncConnectionPool

from aiwfe.kernel import Plugin, pg, serves

from .contract import ExpertScore, ExpertScores, ExpertScoresResult, Feedback, FeedbackResult

__all__ = ["LearningPlugin", "bayes"]

MIGRATIONS = Path(__file__).with_name("migrations")
ALL = "*"  # the row of feedback on any of the requested tags

_SCORES_SQL = """
WITH f AS (
    SELECT expert, expertise, (rating - 1) / 4.0 AS r,
           power(0.5, extract(epoch FROM now() - created_at) / %(half_life_s)s) AS w
    FROM feedback WHERE expert = ANY(%(experts)s)
)
SELECT expert, NULL::text AS tag, sum(w * r), sum(w), count(*) FROM f GROUP BY expert
UNION ALL
SELECT expert, t, sum(w * r), sum(w), count(*) FROM f, unnest(f.expertise) AS t GROUP BY expert, t
UNION ALL
SELECT expert, '*', sum(w * r), sum(w), count(*) FROM f WHERE f.expertise && %(tags)s::text[] GROUP BY expert
"""


def bayes(prior: float, prior_weight: float, weighted_sum: float, weight: float) -> float:
    """The Bayesian average of decayed ratings (see the module docstring), rounded to 4 places."""
    return round((prior * prior_weight + weighted_sum) / (prior_weight + weight), 4)


class LearningPlugin(Plugin):
    """Serves ``learning.feedback`` and ``learning.expert_scores``."""

    name = "learning"
    services = ("postgres",)

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """Configuration.

        ``database_url`` (empty: ``DATABASE_URL``); ``prior_mean`` (0..1) and
        ``prior_weight`` (in ratings) of the Bayesian average; ``half_life_days`` of a
        rating's weight; ``cache_ttl_s`` of computed scores (0 = no cache); pool:
        ``pool_max``, ``pool_timeout_s``, ``pool_max_waiting``.
        """

        database_url: str = ""
        prior_mean: float = 0.6
        prior_weight: float = 5.0
        half_life_days: float = 30.0
        cache_ttl_s: float = 2.0
        pool_max: int = 5
        pool_timeout_s: float = 2.0
        pool_max_waiting: int = 256

    config: Config
    pool: AsyncConnectionPool

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """``prior_mean`` within 0..1, a non-negative ``prior_weight``, a positive ``half_life_days``."""
        problems: list[str | tuple[str, str]] = []
        if not 0.0 <= config.prior_mean <= 1.0:
            problems.append(f"prior_mean: must be from 0 to 1, not {config.prior_mean}")
        if config.prior_weight < 0:
            problems.append(f"prior_weight: must not be negative, not {config.prior_weight}")
        if config.half_life_days <= 0:
            problems.append(f"half_life_days: must be positive, not {config.half_life_days}")
        return problems

    def __init__(self, config: Config, kernel: object) -> None:
        super().__init__(config, kernel)  # type: ignore[arg-type]
        self._cache: dict[tuple[tuple[str, ...], tuple[str, ...], bool], tuple[float, ExpertScoresResult]] = {}

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the pool and apply migrations."""
        c = self.config
        self.pool = await pg.open_pool(
            pg.database_url(c.database_url),
            name="learning",
            max_size=c.pool_max,
            timeout_s=c.pool_timeout_s,
            max_waiting=c.pool_max_waiting,
        )
        try:
            await pg.migrate(self.pool, "learning", MIGRATIONS)
            yield
        finally:
            await self.pool.close()

    @serves(Feedback, concurrency=32, max_queue=2048)
    async def feedback(self, req: Feedback) -> FeedbackResult:
        """Store a rating (replacing the same rater's earlier rating of the same answer).

        Raises:
            ValueError: rating outside 1..5, or empty job or expert.
            Overloaded: the database pool is exhausted.
        """
        if not 1.0 <= req.rating <= 5.0:
            raise ValueError(f"learning.feedback: rating must be from 1 to 5, got {req.rating}")
        if not req.job or not req.expert:
            raise ValueError("learning.feedback: job and expert must not be empty")
        async with pg.connection(self.pool) as conn:
            cur = await conn.execute(
                "INSERT INTO feedback (job, expert, rater, rating, expertise, comment) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (job, expert, rater) DO UPDATE SET rating = EXCLUDED.rating,"
                " expertise = EXCLUDED.expertise, comment = EXCLUDED.comment, created_at = now() RETURNING id",
                (req.job, req.expert, req.rater, req.rating, list(req.expertise), req.comment),
            )
            row = await cur.fetchone()
        self._cache.clear()
        assert row is not None
        return FeedbackResult(id=int(row[0]))

    @serves(ExpertScores, concurrency=64, max_queue=4096)
    async def expert_scores(self, req: ExpertScores) -> ExpertScoresResult:
        """Scores of the requested experts (see the module docstring). One SQL statement."""
        key = (tuple(req.experts), tuple(sorted(req.expertise)), req.detail)
        ttl = self.config.cache_ttl_s
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        c = self.config
        stats: dict[str, dict[str | None, tuple[float, float, int]]] = {e: {} for e in req.experts}
        if req.experts:
            async with pg.connection(self.pool) as conn:
                cur = await conn.execute(
                    _SCORES_SQL,
                    {"experts": list(req.experts), "tags": list(req.expertise), "half_life_s": c.half_life_days * 86400.0},
                )
                for expert, tag, wsum, w, n in await cur.fetchall():
                    stats[expert][tag] = (float(wsum), float(w), int(n))
        scores: dict[str, float] = {}
        detail: dict[str, ExpertScore] = {}
        for expert, rows in stats.items():
            wsum, w, n = rows.get(None, (0.0, 0.0, 0))
            overall = bayes(c.prior_mean, c.prior_weight, wsum, w)
            if req.expertise:
                tag_wsum, tag_w, _ = rows.get(ALL, (0.0, 0.0, 0))
                scores[expert] = bayes(overall, c.prior_weight, tag_wsum, tag_w)
            else:
                scores[expert] = overall
            if req.detail:
                by_tag = {
                    str(t): bayes(overall, c.prior_weight, v[0], v[1])
                    for t, v in sorted(rows.items(), key=str)
                    if t not in (None, ALL)
                }
                detail[expert] = ExpertScore(overall=overall, count=n, weight=round(w, 4), by_expertise=by_tag)
        result = ExpertScoresResult(scores=scores, detail=detail)
        if ttl > 0:
            if len(self._cache) > 1024:
                self._cache.clear()
            self._cache[key] = (now, result)
        return result
