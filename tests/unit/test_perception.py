"""perception: keywords, description similarity, and the LLM mode (with a fake model plugin)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import Plugin, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.perception.plugin import (
    _DEFAULT_EXPERTISE,
    PerceptionPlugin,
    _cosine,
    analyse,
    trigram_index,
    trigram_similarities,
    trigram_vector,
)
from aiwfe.plugins.reasoning.contract import Reason, Reasoned


class FakeModel(Plugin):
    """Answers every Reason with a fixed text naming two tags (a model's reply)."""

    name = "fakemodel"

    @serves(Reason)
    async def reason(self, req: Reason) -> Reasoned:
        return Reasoned(answer="This needs security and testing expertise.", confidence=0.9, provider="fake")


def vectors() -> dict[str, dict[int, float]]:
    return PerceptionPlugin(PerceptionPlugin.Config(), None).vectors  # type: ignore[arg-type]


def tags(text: str) -> list[str]:
    return [s.tag for s in analyse(text, _DEFAULT_EXPERTISE, 5, vectors()).expertise]


def test_keywords_intent_language_entities() -> None:
    p = analyse("How fast is the Postgres database index?", _DEFAULT_EXPERTISE, 5)
    assert (p.intent, p.language) == ("question", "en")
    assert [s.tag for s in p.expertise] == ["database", "performance"]
    assert p.expertise[0].score == 1.0
    assert analyse("Deploy Kubernetes on 3 nodes", _DEFAULT_EXPERTISE, 5).intent == "command"
    assert "3" in analyse("Deploy Kubernetes on 3 nodes", _DEFAULT_EXPERTISE, 5).entities


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("The authentication tokens leak", "security"),  # no keyword matches exactly ("tokens")
        ("Our containers crash during rollout to the cluster", "devops"),
    ],
)
def test_description_similarity_finds_tags_keywords_miss(text: str, tag: str) -> None:
    assert analyse(text, _DEFAULT_EXPERTISE, 5).expertise == []  # keywords alone find nothing
    assert tags(text)[0] == tag


@pytest.mark.parametrize("text", ["hello there", "I like soup and bread", "What is the weather today?"])
def test_unrelated_text_needs_no_expertise(text: str) -> None:
    assert tags(text) == []


@contextlib.asynccontextmanager
async def pod(mode: str, with_model: bool) -> AsyncIterator[PodRunner]:
    plugins = '"perception"' + (', "tests.unit.test_perception:FakeModel"' if with_model else "")
    m = parse_manifest(f'[pods.p]\nplugins = [{plugins}]\n[plugins.perception]\nmode = "{mode}"\nllm_timeout_s = 1\n', env={})
    async with PodRunner(m, "p", LocalBus("pc"), ops_port=0) as p:
        yield p


async def test_llm_mode_adds_the_tags_the_model_names() -> None:
    async with pod("llm", with_model=True) as p:
        r = await p.kernel.call(Perceive(text="How fast is the Postgres database index?"))
        got = {s.tag: s.score for s in r.expertise}
        assert got["database"] == 1.0 and got["security"] == 0.9 and got["testing"] == 0.9


async def test_llm_mode_falls_back_to_builtin_without_a_model() -> None:
    async with pod("llm", with_model=False) as p:
        r = await p.kernel.call(Perceive(text="How fast is the Postgres database index?"))
        assert [s.tag for s in r.expertise][:2] == ["database", "performance"]


def test_the_inverted_index_gives_the_cosines_of_the_scan() -> None:
    vectors = {t: trigram_vector(" ".join([t, *kw])) for t, kw in _DEFAULT_EXPERTISE.items()}
    index = trigram_index(vectors)
    texts = ["How fast is the Postgres database index?", "Deploy it to Kubernetes", "", "zzzz qqqq", "Ünïcode naïve café 東京"]
    for text in texts:
        tv = trigram_vector(text)
        scan = {t: _cosine(tv, v) for t, v in vectors.items()}
        sims = trigram_similarities(text, index)
        assert set(sims) == {t for t, c in scan.items() if c != 0.0}, text
        for tag, c in sims.items():
            assert abs(c - scan[tag]) < 1e-12, (text, tag)
        # and the perception analyse() makes from them is the one the scan made
        c = PerceptionPlugin.Config()
        assert analyse(text, c.expertise, 5, vectors, 0.8, 0.2, sims) == analyse(text, c.expertise, 5, vectors, 0.8, 0.2)
