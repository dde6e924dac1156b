"""Memory, learning and reasoning under every shipped manifest, each pod a child process.

Each shipped manifest is reduced to perception, reasoning, memory and learning, kept where
it places them (added where the final report recommends if it does not: the single pod of
the monolith, the cognitive engine of the consolidated manifest, a pod each in
microservices); every pod runs as ``aiwfe run`` against a real NATS and PostgreSQL, and
every placement must give the same results.
"""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.routing import Kernel
from aiwfe.plugins.learning.contract import ExpertScores, Feedback
from aiwfe.plugins.memory.contract import Forget, Recall, Remember
from aiwfe.plugins.reasoning.contract import Reason
from aiwfe.plugins.reasoning.plugin import extract
from tests.support.pods import dump_toml, run_pods

pytestmark = [pytest.mark.integration, pytest.mark.placement, pytest.mark.usefixtures("cleanup_streams")]

PLACEMENTS = ["monolith", "consolidated", "microservices"]
RESULTS: dict[str, Any] = {}
DOCS = [
    "An index makes a PostgreSQL query fast.",
    "Vacuum PostgreSQL tables to keep them small.",
    "Kubernetes restarts pods that fail their liveness probe.",
    "A cache in Redis saves database round trips.",
]


def build_manifest(name: str, prefix: str, root: Path, data_dir: Path) -> dict[str, Any]:
    """The shipped manifest reduced to this suite's plugins, placed where the manifest puts
    them (memory and learning added where the report recommends when it does not yet)."""
    data = tomllib.loads((root / "manifests" / f"{name}.toml").read_text())
    data["system"]["subject_prefix"] = prefix
    ours = {"perception", "reasoning", "memory", "learning"}
    pods = {}
    for pod_name, pod in data["pods"].items():
        pod["plugins"] = [p for p in pod["plugins"] if p in ours]
        pod.pop("replicas", None)
        if pod["plugins"]:
            pods[pod_name] = pod
    placed = {p for pod in pods.values() for p in pod["plugins"]}
    for plugin in sorted(ours - placed):
        if name == "monolith":
            next(iter(pods.values()))["plugins"].append(plugin)
        elif name == "consolidated":
            pods["cognitive-processing-engine"]["plugins"].append(plugin)
        else:
            pods[plugin] = {"plugins": [plugin]}
    data["pods"] = pods
    data["plugins"] = {
        "memory": {"data_dir": str(data_dir), "collection": prefix},
        "reasoning": {"provider": "extractive"},
    }
    return data


@pytest.fixture(params=PLACEMENTS)
async def system(
    request: pytest.FixtureRequest, prefix: str, nats_url: str, pg_url: str, tmp_path: Path, repo_root: Path
) -> AsyncIterator[tuple[str, Kernel]]:
    data = build_manifest(request.param, prefix, repo_root, tmp_path / "data")
    path = tmp_path / f"{request.param}.toml"
    path.write_text(dump_toml(data))
    cm = run_pods(path, list(data["pods"]), {"NATS_URL": nats_url, "DATABASE_URL": pg_url, "QDRANT_URL": ""}, tmp_path)
    await asyncio.to_thread(cm.__enter__)
    bus = NatsBus(nats_url, prefix, name="placement-client")
    await bus.start()
    try:
        yield request.param, Kernel(bus)
    finally:
        await bus.close()
        await asyncio.to_thread(cm.__exit__, None, None, None)


@pytest.mark.timeout(180)
async def test_cognitive_plugins_end_to_end(system: tuple[str, Kernel]) -> None:
    placement, k = system
    ids = [(await k.call(Remember(text=t, owner="alice", metadata={"n": i}))).id for i, t in enumerate(DOCS)]
    await k.call(Remember(text="Bob's PostgreSQL notes.", owner="bob"))
    recall = await k.call(Recall(query="make a PostgreSQL query fast", owner="alice", k=3))
    assert recall.hits[0].id == ids[0] and all(h.id in ids for h in recall.hits)
    assert (await k.call(Forget(id=ids[0], owner="alice"))).forgotten
    after = await k.call(Recall(query="make a PostgreSQL query fast", owner="alice", k=3))
    assert ids[0] not in [h.id for h in after.hits]

    await k.call(Feedback(job="j1", expert="dba", rating=5, expertise=["database"]))
    await k.call(Feedback(job="j1", expert="poet", rating=2, expertise=["database"]))
    scores = await k.call(ExpertScores(experts=["dba", "poet", "new"], expertise=["database"]))

    context = [h.text for h in after.hits]
    answers = await asyncio.gather(
        *(k.call(Reason(role=r, task="How to keep PostgreSQL small?", context=context)) for r in ["dba", "poet"])
    )
    assert [(a.answer, a.confidence) for a in answers] == [
        extract(r, "How to keep PostgreSQL small?", context, 3) for r in ["dba", "poet"]
    ]
    RESULTS[placement] = {
        "recall": [(DOCS.index(h.text), h.found_by, h.score) for h in recall.hits],
        "after": [DOCS.index(h.text) for h in after.hits],
        "scores": scores.scores,
        "answers": [a.answer for a in answers],
    }


def test_placements_agree() -> None:
    if len(RESULTS) < len(PLACEMENTS):
        pytest.skip("runs after the end-to-end test of every placement")
    first = RESULTS[PLACEMENTS[0]]
    assert all(RESULTS[p] == first for p in PLACEMENTS)
