"""The learning plugin against a real PostgreSQL (LocalBus and a real NATS server)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiwfe.kernel import RemoteError, pg
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.learning import plugin as learning
from aiwfe.plugins.learning.contract import ExpertScores, Feedback
from tests.support.pods import running

pytestmark = [pytest.mark.integration]

Start = Callable[..., contextlib.AbstractAsyncContextManager[dict[str, PodRunner]]]


def manifest(prefix: str, pg_url: str, **cfg: Any) -> str:
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {"database_url": pg_url, **cfg}.items())
    return (
        f'[system]\nsubject_prefix = "{prefix}"\ndrain_timeout_s = 2\n'
        '[pods.learn]\nplugins = ["learning"]\n[pods.client]\nplugins = []\n'
        f"[plugins.learning]\n{body}\n"
    )


@pytest.fixture
def start(prefix: str, pg_url: str) -> Start:
    @contextlib.asynccontextmanager
    async def run(**cfg: Any) -> AsyncIterator[dict[str, PodRunner]]:
        m = parse_manifest(manifest(prefix, pg_url, **cfg), env={})
        async with running(m) as pods:
            yield pods

    return run


async def test_scores_follow_feedback(start: Start) -> None:
    async with start(cache_ttl_s=0) as pods:
        k = pods["client"].kernel
        for i in range(6):
            await k.call(Feedback(job=f"j{i}", expert="dba", rating=5, expertise=["database"]))
            await k.call(Feedback(job=f"j{i}", expert="poet", rating=1, expertise=["database"], comment="wrong"))
        await k.call(Feedback(job="j9", expert="poet", rating=5, expertise=["writing"]))
        r = await k.call(ExpertScores(experts=["dba", "poet", "newbie"], detail=True))
        assert r.scores["newbie"] == 0.6  # the prior
        assert r.scores["dba"] > 0.6 > r.scores["poet"]
        assert r.detail["dba"].count == 6 and r.detail["poet"].count == 7
        assert set(r.detail["poet"].by_expertise) == {"database", "writing"}
        assert r.detail["poet"].by_expertise["writing"] > r.detail["poet"].by_expertise["database"]
        on_db = await k.call(ExpertScores(experts=["poet"], expertise=["database"]))
        on_writing = await k.call(ExpertScores(experts=["poet"], expertise=["writing"]))
        assert on_db.scores["poet"] < r.scores["poet"] < on_writing.scores["poet"]
        # the same rater rating the same answer again replaces the rating
        a = await k.call(Feedback(job="j9", expert="poet", rating=1, expertise=["writing"]))
        b = await k.call(Feedback(job="j9", expert="poet", rating=1, expertise=["writing"]))
        assert a.id == b.id
        assert (await k.call(ExpertScores(experts=["poet"], detail=True))).detail["poet"].count == 7


async def test_old_feedback_decays(start: Start) -> None:
    async with start(cache_ttl_s=0, half_life_days=1.0) as pods:
        k = pods["client"].kernel
        await k.call(Feedback(job="old", expert="e", rating=1))
        plugin = pods["learn"].plugins["learning"]
        assert isinstance(plugin, learning.LearningPlugin)
        async with pg.connection(plugin.pool) as conn:
            await conn.execute("UPDATE feedback SET created_at = now() - interval '30 days'")
        await k.call(Feedback(job="new", expert="e", rating=5))
        r = await k.call(ExpertScores(experts=["e"], detail=True))
        assert r.scores["e"] == pytest.approx(learning.bayes(0.6, 5, 1.0, 1.0), abs=1e-3)
        assert r.detail["e"].weight == pytest.approx(1.0, abs=1e-3)


async def test_bad_ratings_are_refused_and_cache_is_invalidated(start: Start) -> None:
    async with start(cache_ttl_s=60) as pods:
        k = pods["learn"].kernel
        with pytest.raises(RemoteError) as e:
            await k.call(Feedback(job="j", expert="e", rating=9))
        assert e.value.type == "ValueError"
        before = await k.call(ExpertScores(experts=["e"]))
        assert before is await k.call(ExpertScores(experts=["e"]))  # cached
        await k.call(Feedback(job="j", expert="e", rating=5))
        assert (await k.call(ExpertScores(experts=["e"]))).scores["e"] > before.scores["e"]


@pytest.mark.usefixtures("cleanup_streams")
async def test_over_nats(prefix: str, pg_url: str, nats_url: str) -> None:
    m = parse_manifest(manifest(prefix, pg_url), env={})
    async with running(m, nats_url=nats_url) as pods:
        k = pods["client"].kernel
        await k.call(Feedback(job="j", expert="e", rating=4, expertise=["x"]))
        r = await k.call(ExpertScores(experts=["e", "f"], expertise=["x"], detail=True))
        assert set(r.scores) == {"e", "f"} and r.detail["e"].by_expertise == {"x": r.scores["e"]}
