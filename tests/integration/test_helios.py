"""Helios end to end with its real collaborators: memory (PostgreSQL + vectors), learning,
perception and reasoning, over NATS, with the Redis answer cache and the run store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.helios.contract import Ask
from aiwfe.plugins.learning.contract import ExpertScores, Feedback
from aiwfe.plugins.memory.contract import Remember

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

MANIFEST = """
[system]
subject_prefix = "{prefix}"
[pods.front]
plugins = ["helios"]
[pods.cognitive]
plugins = ["memory", "learning", "perception", "reasoning"]
[plugins.helios]
database_url = "{db}"
redis_url = "{redis}"
cache_prefix = "{prefix}:"
[plugins.memory]
database_url = "{db}"
data_dir = "{data}"
collection = "{prefix}"
[plugins.learning]
database_url = "{db}"
"""


@contextlib.asynccontextmanager
async def system(prefix: str, nats_url: str, db: str, redis: str, data: Path) -> AsyncIterator[dict[str, PodRunner]]:
    m = parse_manifest(MANIFEST.format(prefix=prefix, db=db, redis=redis, data=data), env={})
    async with contextlib.AsyncExitStack() as stack:
        pods = {}
        for name in ("cognitive", "front"):
            pods[name] = await stack.enter_async_context(PodRunner(m, name, NatsBus(nats_url, prefix, name=name), ops_port=0))
        yield pods


async def test_experts_answer_from_the_owners_memories(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with system(prefix, nats_url, pg_url, redis_url, tmp_path) as pods:
        k = pods["front"].kernel
        for text in [
            "The orders database uses a B-tree index on customer_id for fast lookups.",
            "Security review: tokens must expire after fifteen minutes.",
            "The cafeteria serves soup on Fridays.",
        ]:
            await pods["cognitive"].kernel.call(Remember(text=text, owner="alice"))
        await pods["cognitive"].kernel.call(Remember(text="Bob's database index is on the email column.", owner="bob"))
        job_id = await k.submit(Ask(text="Which database index speeds up customer lookups?", owner="alice", max_experts=3))
        rec = await k.wait_job(job_id, timeout_s=30)
        assert rec.status == "done", rec.error
        result = msgspec.msgpack.decode(rec.result)
        assert "B-tree index on customer_id" in result["answer"]
        assert "email column" not in result["answer"]  # never another owner's memory
        assert result["confidence"] > 0
        # reasoning runs in another pod, yet its partial output lands in this job's events
        events = [ev async for ev in k.job_events(job_id)]
        streamed = [ev.data for ev in events if ev.type == "reasoning.answer_streamed"]
        assert {d["label"] for d in streamed} == {e["expert"] for e in result["experts"]}
        # the synthesis deltas (sent together, confirmed together) are one event each, in order,
        # right before the terminal event
        deltas = [ev for ev in events if ev.type == "helios.synthesis_delta"]
        assert deltas and " ".join(ev.data["text"] for ev in deltas) == result["answer"]
        assert [ev.seq for ev in events[-len(deltas) - 1 :]] == sorted(ev.seq for ev in events[-len(deltas) - 1 :])
        assert events[-len(deltas) - 1 : -1] == deltas and events[-1].type == "job.done"


async def test_learning_scores_steer_expert_selection(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with system(prefix, nats_url, pg_url, redis_url, tmp_path) as pods:
        k = pods["front"].kernel
        cog = pods["cognitive"].kernel
        ask = Ask(text="Tune the database query", max_experts=1, use_cache=False)
        first = msgspec.msgpack.decode((await k.wait_job(await k.submit(ask), timeout_s=30)).result)
        top = first["experts"][0]["expert"]
        for i in range(20):
            await cog.call(Feedback(job=f"j{i}", expert=top, rating=1, expertise=["database"], rater=f"r{i}"))
        scores = (await cog.call(ExpertScores(experts=[top], expertise=["database"]))).scores
        assert scores[top] < 0.5
        again = msgspec.msgpack.decode((await k.wait_job(await k.submit(ask), timeout_s=30)).result)
        assert again["experts"][0]["expert"] != top
