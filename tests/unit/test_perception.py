"""perception: keywords, description similarity, and the LLM mode (with a fake model plugin)."""

from __future__ import annotations

import contextlib
import math
import random
import re
import sys
from collections.abc import AsyncIterator

import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import Plugin, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.perception.contract import ExpertiseScore, Perceive, Perception
from aiwfe.plugins.perception.plugin import (
    _DEFAULT_DESCRIPTIONS,
    _DEFAULT_EXPERTISE,
    _LOWER_JOINS,
    _STOPWORDS,
    _WORD,
    CACHED_WORD_MAX,
    PerceptionPlugin,
    _analyse,
    _approximate_similarities,
    _cached_trigrams,
    _cosine,
    _tokens,
    _word_trigrams,
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


# --- the fast path against the computation it replaced --------------------------------------
# perceive used to tokenise twice, build the text's trigram vector, add a product per shared
# trigram and tag, and test every keyword of every tag; below is that code as the reference
# the fast path must equal exactly (verbatim but for _word_trigrams, which now takes the word
# with its dots stripped, and the command words written out).


def _old_trigram_vector(text: str) -> dict[int, float]:
    vec: dict[int, float] = {}
    for w in _WORD.findall(text.lower()):
        for h in _word_trigrams(w.strip(".")):
            vec[h] = vec.get(h, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {k: v / norm for k, v in vec.items()} if norm else vec


def _old_trigram_similarities(text: str, index: dict[int, tuple[tuple[str, float], ...]]) -> dict[str, float]:
    sims: dict[str, float] = {}
    for h, v in _old_trigram_vector(text).items():
        for tag, w in index.get(h, ()):
            sims[tag] = sims.get(tag, 0.0) + v * w
    return sims


def _old_analyse(
    text: str,
    expertise: dict[str, list[str]],
    max_tags: int,
    vectors: dict[str, dict[int, float]] | None = None,
    similarity_weight: float = 0.8,
    min_similarity: float = 0.2,
    similarities: dict[str, float] | None = None,
) -> Perception:
    words = _WORD.findall(text)
    lower = [w.lower().strip(".") for w in words]
    bag = set(lower)
    stripped = text.strip()
    if stripped.endswith("?") or (
        lower and lower[0] in {"what", "how", "why", "when", "where", "who", "which", "can", "is", "are"}
    ):
        intent = "question"
    elif lower and lower[0] in {
        "write",
        "create",
        "build",
        "make",
        "fix",
        "deploy",
        "explain",
        "design",
        "list",
        "show",
        "add",
        "remove",
    }:
        intent = "command"
    else:
        intent = "statement"
    language = max(_STOPWORDS, key=lambda lang: (len(bag & _STOPWORDS[lang]), lang == "en"))
    entities: list[str] = []
    for i, w in enumerate(words):
        if (w[:1].isupper() and i > 0 and words[i - 1][-1:] not in ".!?") or w.isdigit():
            if w not in entities:
                entities.append(w.strip("."))
    scores = []
    text_vec = _old_trigram_vector(text) if vectors and similarities is None else {}
    for tag, keywords in expertise.items():
        hits = sum(1 for k in keywords if k.lower() in bag)
        score = min(1.0, hits / min(3, len(keywords))) if keywords else 0.0
        sim = None
        if similarities is not None:
            sim = similarities.get(tag)
        elif vectors and tag in vectors:
            sim = _cosine(text_vec, vectors[tag])
        if sim is not None:
            if sim >= min_similarity:
                score = max(score, similarity_weight * sim)
        if score > 0:
            scores.append(ExpertiseScore(tag=tag, score=round(score, 4)))
    scores.sort(key=lambda s: (-s.score, s.tag))
    return Perception(intent=intent, language=language, entities=entities, expertise=scores[: max(0, max_tags)])


def _old_perceive(p: PerceptionPlugin, text: str, max_tags: int) -> Perception:
    c = p.config
    sims = _old_trigram_similarities(text, p.index)
    return _old_analyse(text, c.expertise, max_tags, p.vectors, c.similarity_weight, c.min_similarity, sims)


def _perceive_now(p: PerceptionPlugin, text: str, max_tags: int = 5) -> Perception:
    """perceive() driven to its end in place (the hashing builtin mode never suspends)."""
    coro = p.perceive(Perceive(text=text, max_tags=max_tags))
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    return done.value.value  # type: ignore[no-any-return]


def _texts() -> list[str]:
    vocabulary = sorted(
        {w for kws in _DEFAULT_EXPERTISE.values() for w in kws}
        | {w for d in _DEFAULT_DESCRIPTIONS.values() for w in _WORD.findall(d)}
        | {w for ws in _STOPWORDS.values() for w in ws}
    )
    vocabulary += ["İstanbul", "ŸES", "STRAẞE", "\u212aelvin", "\u212bngström", "naïve", "café", "Übergrößenträger", "東京"]
    vocabulary += ["3", "42", "2024", "v1.2.3", "C++", "C#", "node.js", "...", ".", "e.g.", "U.S.A.", "-", "_x_", "a+b"]
    fixed = [
        "",
        " ",
        "?",
        "...",
        "How fast is the database index on the orders table?",
        "How fast is the Postgres database index?",
        "Deploy Kubernetes on 3 nodes",
        "The authentication tokens leak",
        "Our containers crash during rollout to the cluster",
        "hello there",
        "What is the weather today?",
        "DATABASE Database database database. database?",
        "the the the the the the the the",
        "İİİ ŸŸ ẞ \u212a \u212b İstanbul KELVIN",
        "Ünïcode naïve café 東京 Übergrößenträger",
        "1 2 3 4 5 6 7 8 9 10 3.14 1e9",
        "Wie ist das Wetter? Der Hund und die Katze.",
        "¿Cómo está el servidor para los usuarios?",
        "Comment est la performance pour les tests avec pytest?",
        "sql sql SQL Sql sQl postgres postgresql index query schema",
        "security. Security! SECURITY? auth.token.password",
        " ".join(["performance latency throughput slow fast benchmark cache"] * 200),
        "x" * 5000,
        "database " * 3000,
    ]
    rng = random.Random(20261202)
    made = []
    for _ in range(400):
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 60])
        words = []
        for _ in range(n):
            r = rng.random()
            if r < 0.7:
                w = rng.choice(vocabulary)
            elif r < 0.85:
                w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzäöüéèß0123456789._-#+") for _ in range(rng.randint(1, 12)))
            else:
                w = rng.choice(["the", "and", "How", "Why", "Write", "deploy", "Fix"])
            w = rng.choice([w, w, w.capitalize(), w.upper(), w + ".", w + ",", w + "?", w + "!"])
            words.append(w)
        made.append(rng.choice([" ", "  ", " \n", ", "]).join(words) + rng.choice(["", "", "?", ".", "!", " ?"]))
    return fixed + made


_CUSTOM = {
    "Expertise": ["Database", "database", "SQL", "sql", "x"],  # duplicates and capitals count per listing
    "empty": [],
    "one": ["the"],
    "shared": ["index", "cache", "token"],
    "unicode": ["café", "naïve", "東京", "straße"],
}


@pytest.mark.parametrize(
    "config",
    [
        PerceptionPlugin.Config(),
        PerceptionPlugin.Config(min_similarity=0.0, similarity_weight=1.0),
        PerceptionPlugin.Config(min_similarity=0.05, similarity_weight=0.55),
        PerceptionPlugin.Config(min_similarity=-1.0, similarity_weight=-0.5),
        PerceptionPlugin.Config(expertise=_CUSTOM, descriptions={"Expertise": "databases and SQL tables"}),
    ],
    ids=["default", "floor0", "other", "negative", "custom"],
)
def test_perceive_equals_the_computation_it_replaced(config: PerceptionPlugin.Config) -> None:
    p = PerceptionPlugin(config, None)  # type: ignore[arg-type]
    for i, text in enumerate(_texts()):
        max_tags = (5, 1, 0, 20, -1)[i % 5]
        assert _perceive_now(p, text, max_tags) == _old_perceive(p, text, max_tags), (text, max_tags)
        # the public pieces keep their exact values
        assert trigram_similarities(text, p.index) == _old_trigram_similarities(text, p.index), text
        assert trigram_vector(text) == _old_trigram_vector(text), text
        assert analyse(text, config.expertise, max_tags, p.vectors, 0.8, 0.2) == _old_analyse(
            text, config.expertise, max_tags, p.vectors, 0.8, 0.2
        ), text
        assert analyse(text, config.expertise, max_tags) == _old_analyse(text, config.expertise, max_tags), text


def test_a_similarity_at_a_decision_takes_the_exact_sums() -> None:
    """The per-word sums differ from the old order's in the last bits: a similarity within
    their tolerance of the floor or of a rounding boundary takes the exact sums instead."""
    base = PerceptionPlugin(PerceptionPlugin.Config(), None)  # type: ignore[arg-type]
    checked = 0
    for text in _texts()[:120]:
        exact = _old_trigram_similarities(text, base.index)
        for tag, sim in sorted(exact.items()):
            if sim < 0.05:
                continue
            # the floor exactly at the similarity (kept by >=), and a weight putting the score on a
            # rounding boundary of round(score, 4)
            for floor, weight in ((sim, 0.8), (0.0, 0.00015 / sim), (0.0, 0.12345 / sim)):
                p = PerceptionPlugin(PerceptionPlugin.Config(min_similarity=floor, similarity_weight=weight), None)  # type: ignore[arg-type]
                sims, tolerance = _approximate_similarities(_tokens(text)[2], p.words, floor)
                assert tolerance > 0 and abs(sims[tag] - sim) < tolerance, (text, tag)
                fast = _analyse(text, _tokens(text), p.table, 20, weight, floor, sims, tolerance)
                assert fast is None, (text, tag, floor, weight)  # unsure: the caller takes the exact sums
                assert _perceive_now(p, text, 20) == _old_perceive(p, text, 20), (text, tag, floor, weight)
                checked += 1
    assert checked > 100


def test_lower_casing_joins_words_only_at_the_listed_characters() -> None:
    """_tokens reuses the lower-cased words for the trigrams unless the text holds a character
    of _LOWER_JOINS: every other character lower-cases to characters on the same side of _WORD."""
    inside = re.compile(_WORD.pattern.removesuffix("+"))
    joins = {c for c in map(chr, range(sys.maxunicode + 1)) if not inside.fullmatch(c) and inside.search(c.lower())}
    assert {c for c in joins if _LOWER_JOINS.fullmatch(c)} == joins
    assert all(len(c.lower()) == 1 and inside.fullmatch(c.lower()) for c in map(chr, range(0x250)) if inside.fullmatch(c))


def test_the_word_caches_are_bounded() -> None:
    p = PerceptionPlugin(PerceptionPlugin.Config(), None)  # type: ignore[arg-type]
    assert 0 < (_cached_trigrams.cache_info().maxsize or 0) <= 1 << 16
    assert 0 < (p.words.cache_info().maxsize or 0) <= 1 << 16  # type: ignore[attr-defined]
    # long words are not cached at all: entries are bounded, their size must be too
    before = (_cached_trigrams.cache_info().currsize, p.words.cache_info().currsize)  # type: ignore[attr-defined]
    p.words("x" * (CACHED_WORD_MAX + 1))
    assert _word_trigrams("y" * 1000) == _word_trigrams("y" * 1000)
    assert (_cached_trigrams.cache_info().currsize, p.words.cache_info().currsize) == before  # type: ignore[attr-defined]
    p.words("short")
    assert p.words.cache_info().currsize == before[1] + 1  # type: ignore[attr-defined]
