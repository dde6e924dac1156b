"""perception plugin: what a request is about, and which expertise it needs.

Built-in mode (``mode = "builtin"``): intent from the sentence form, language from
stopwords, entities from capitalised words and numbers; each expertise tag scores the
higher of (a) the share of the tag's keywords found in the text and (b) the embedding
similarity of the text to the tag's description (cosine; counted from ``min_similarity``
on, scaled by ``similarity_weight``), so a request that words things differently still
finds its experts. ``embedder``: ``hashing`` compares character-trigram hashing vectors;
``semantic`` uses memory's sentence-embedding model (:mod:`aiwfe.plugins.memory.semantic`,
the same loaded model when both run in one pod) with its own ``semantic_min_similarity``;
``auto`` is semantic when it can run here, else hashing (noted under ``/ready``'s degraded).
Deterministic and free of I/O.

LLM mode (``mode = "llm"``): the built-in analysis, plus one ``reasoning.reason`` call
asking a model which tags apply; a tag the model names scores at least
``llm_weight``. When the call fails the built-in result stands (never worse than built-in).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Any

import msgspec

from aiwfe.kernel import AiwfeError, Plugin, serves
from aiwfe.kernel.config_check import one_of, problem_text
from aiwfe.kernel.errors import ConfigError
from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable
from aiwfe.plugins.reasoning.contract import Reason

from .contract import ExpertiseScore, Perceive, Perception

__all__ = ["PerceptionPlugin"]

_DEFAULT_EXPERTISE = {
    "architecture": ["architecture", "design", "service", "microservice", "system", "component"],
    "security": ["security", "auth", "token", "password", "vulnerability", "encrypt", "jwt"],
    "database": ["database", "sql", "postgres", "postgresql", "index", "query", "schema"],
    "performance": ["performance", "latency", "throughput", "slow", "fast", "benchmark", "cache"],
    "devops": ["deploy", "kubernetes", "k8s", "docker", "container", "ci", "pipeline"],
    "frontend": ["ui", "frontend", "css", "html", "javascript", "react", "page"],
    "backend": ["api", "backend", "endpoint", "server", "http", "rest"],
    "data": ["data", "dataset", "analytics", "etl", "statistics", "csv"],
    "ml": ["model", "training", "embedding", "llm", "neural", "inference", "vector"],
    "testing": ["test", "testing", "pytest", "coverage", "bug", "regression"],
    "product": ["user", "feature", "roadmap", "requirement", "customer", "market"],
    "writing": ["write", "document", "docs", "explain", "summary", "summarise", "summarize"],
}
_DEFAULT_DESCRIPTIONS = {
    "architecture": "software architecture, system design, services, components, boundaries, coupling and scalability",
    "security": "security, authentication, authorization, tokens, passwords, encryption, vulnerabilities, leaks and attacks",
    "database": "databases, SQL, PostgreSQL, tables, indexes, queries, schemas, transactions and migrations",
    "performance": "performance, latency, throughput, slowness, speed, benchmarks, caching and profiling",
    "devops": "deployment, Kubernetes clusters, containers, Docker, rollouts, CI pipelines, infrastructure and operations",
    "frontend": "frontend user interfaces, web pages, HTML, CSS, JavaScript, React components and browsers",
    "backend": "backend servers, APIs, HTTP endpoints, REST, request handling and services",
    "data": "data engineering, datasets, analytics, ETL pipelines, statistics, reports and CSV files",
    "ml": "machine learning, models, training, embeddings, neural networks, LLMs, inference and vectors",
    "testing": "testing, tests, pytest, coverage, bugs, regressions, quality assurance and fixtures",
    "product": "product management, users, customers, features, roadmaps, requirements and markets",
    "writing": "writing, documentation, docs, explanations, summaries, guides and tutorials",
}
_STOPWORDS = {
    "en": {"the", "and", "is", "are", "what", "how", "to", "of", "a", "in", "for", "with"},
    "de": {"der", "die", "das", "und", "ist", "wie", "nicht", "mit", "ein", "eine"},
    "fr": {"le", "la", "les", "et", "est", "une", "pour", "avec", "des", "comment"},
    "es": {"el", "los", "las", "y", "es", "una", "para", "con", "como", "por"},
}
_WORD = re.compile(r"[A-Za-zÀ-ÿ0-9_+#.-]+")
_COMMAND = {"write", "create", "build", "make", "fix", "deploy", "explain", "design", "list", "show", "add", "remove"}


class PerceptionPlugin(Plugin):
    """Serves ``perception.perceive``."""

    name = "perception"

    calls = (Reason,)

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """``expertise`` maps a tag to its keywords (replaces the built-in table when set);
        ``descriptions`` maps a tag to a sentence describing it (default: its keywords).
        ``mode``: ``builtin`` or ``llm``; ``llm_timeout_s`` bounds the model call."""

        expertise: dict[str, list[str]] = msgspec.field(default_factory=lambda: dict(_DEFAULT_EXPERTISE))
        descriptions: dict[str, str] = {}
        similarity_weight: float = 0.8
        min_similarity: float = 0.2
        mode: str = "builtin"
        llm_weight: float = 0.9
        llm_timeout_s: float = 10.0
        embedder: str = "hashing"
        embed_model_dir: str = ""
        semantic_min_similarity: float = 0.2

    config: Config

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """``mode`` builtin or llm; ``descriptions`` only for tags of ``expertise``."""
        problems = one_of("mode", config.mode, ("builtin", "llm"))
        problems += one_of("embedder", config.embedder, ("hashing", "semantic", "auto"))
        stray = sorted(set(config.descriptions) - set(config.expertise))
        if stray:
            problems.append(
                f"descriptions: {', '.join(stray)} not among the expertise tags ({', '.join(sorted(config.expertise))})"
            )
        return problems

    def __init__(self, config: Config, kernel: object) -> None:
        problems = self.validate_config(config)
        if problems:
            raise ConfigError("perception: " + "; ".join(map(problem_text, problems)))
        super().__init__(config, kernel)  # type: ignore[arg-type]
        descriptions = {
            t: config.descriptions.get(t) or _DEFAULT_DESCRIPTIONS.get(t) or " ".join([t, *kw])
            for t, kw in config.expertise.items()
        }
        self.vectors = {t: trigram_vector(d) for t, d in descriptions.items()}
        self.index = trigram_index(self.vectors)
        self.semantic: SemanticEmbedder | None = None
        self.embedder_note = ""
        if config.embedder != "hashing":
            try:
                self.semantic = SemanticEmbedder(config.embed_model_dir)
            except SemanticUnavailable as e:
                if config.embedder == "semantic":
                    raise ConfigError(f"perception: embedder semantic: {e}") from None
                self.embedder_note = f"embedder hashing (semantic unavailable: {e})"
        if self.semantic is not None:
            tags = list(descriptions)
            self.dense = dict(zip(tags, self.semantic.embed_sync([descriptions[t] for t in tags]), strict=True))

    def details(self) -> dict[str, Any]:
        """What ``/ready`` shows for this plugin: ``{"embedder": ...}``, the embedder of the
        expertise similarity (``semantic <model> (<source>)``, ``hashing``, or ``hashing
        (semantic unavailable: ...)`` when ``auto`` fell back)."""
        if self.semantic is not None:
            return {"embedder": self.semantic.description}
        return {"embedder": self.embedder_note.removeprefix("embedder ") or "hashing"}

    def degraded(self) -> list[str]:
        """``embedder hashing (semantic unavailable: ...)`` when ``auto`` fell back to hashing."""
        return [self.embedder_note] if self.embedder_note else []

    async def _similarities(self, text: str) -> dict[str, float] | None:
        """Semantic cosine of ``text`` to each tag's description (None with hashing)."""
        if self.semantic is None:
            return None
        (v,) = await self.semantic.embed([text])
        return {t: sum(a * b for a, b in zip(v, d, strict=True)) for t, d in self.dense.items()}

    @serves(Perceive, concurrency=256)
    async def perceive(self, req: Perceive) -> Perception:
        """Analyse the text (see the module docstring)."""
        c = self.config
        sims = await self._similarities(req.text)
        floor = c.min_similarity if sims is None else c.semantic_min_similarity
        if sims is None:  # the same trigram cosines analyse() would compute, from the inverted index
            sims = trigram_similarities(req.text, self.index)
        if c.mode == "builtin":
            return analyse(req.text, c.expertise, req.max_tags, self.vectors, c.similarity_weight, floor, sims)
        base = analyse(req.text, c.expertise, len(c.expertise), self.vectors, c.similarity_weight, floor, sims)
        tags = ", ".join(sorted(c.expertise))
        ask = Reason(
            role="request router", task=f"Which of these expertise tags does this request need: {tags}? Request: {req.text}"
        )
        try:
            r = await self.kernel.call(ask, timeout_s=c.llm_timeout_s)
        except AiwfeError:
            return msgspec.structs.replace(base, expertise=base.expertise[: max(0, req.max_tags)])
        named = {w for w in re.findall(r"[a-z]+", r.answer.lower()) if w in c.expertise}
        scores = {s.tag: s.score for s in base.expertise}
        for tag in named:
            scores[tag] = max(scores.get(tag, 0.0), c.llm_weight)
        ranked = sorted((ExpertiseScore(tag=t, score=round(v, 4)) for t, v in scores.items()), key=lambda s: (-s.score, s.tag))
        return msgspec.structs.replace(base, expertise=ranked[: max(0, req.max_tags)])


def trigram_vector(text: str) -> dict[int, float]:
    """A unit-length sparse vector of hashed character trigrams of the words of ``text``."""
    vec: dict[int, float] = {}
    for w in _WORD.findall(text.lower()):
        for h in _word_trigrams(w):
            vec[h] = vec.get(h, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {k: v / norm for k, v in vec.items()} if norm else vec


@functools.lru_cache(maxsize=1 << 16)
def _word_trigrams(word: str) -> tuple[int, ...]:
    """The hashed trigrams of one lower-cased word (cached: hashing was most of perceive's CPU)."""
    padded = f"#{word.strip('.')}#"
    return tuple(
        int.from_bytes(hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest(), "little")
        for i in range(len(padded) - 2)
    )


def trigram_index(vectors: dict[str, dict[int, float]]) -> dict[int, tuple[tuple[str, float], ...]]:
    """Trigram → (tag, weight) of every tag vector holding it: :func:`trigram_similarities`
    then touches only the tags that share a trigram with the text, instead of a cosine against
    every tag (that scan was ~60 % of a perceive call's CPU; PERFORMANCE.md "Capacity")."""
    index: dict[int, list[tuple[str, float]]] = {}
    for tag, vec in vectors.items():
        for h, w in vec.items():
            index.setdefault(h, []).append((tag, w))
    return {h: tuple(entries) for h, entries in index.items()}


def trigram_similarities(text: str, index: dict[int, tuple[tuple[str, float], ...]]) -> dict[str, float]:
    """The cosine of ``text``'s trigram vector to each tag vector of ``index`` that shares a
    trigram with it (the others are 0 and left out): the same values as :func:`_cosine`."""
    sims: dict[str, float] = {}
    for h, v in trigram_vector(text).items():
        for tag, w in index.get(h, ()):
            sims[tag] = sims.get(tag, 0.0) + v * w
    return sims


def _cosine(a: dict[int, float], b: dict[int, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(k, 0.0) for k, v in a.items())


def analyse(
    text: str,
    expertise: dict[str, list[str]],
    max_tags: int,
    vectors: dict[str, dict[int, float]] | None = None,
    similarity_weight: float = 0.8,
    min_similarity: float = 0.2,
    similarities: dict[str, float] | None = None,
) -> Perception:
    """Pure function behind the built-in mode of :meth:`PerceptionPlugin.perceive`.

    ``vectors`` are the tags' description vectors (:func:`trigram_vector`); without them
    only keywords count. ``similarities`` (tag → cosine, from a semantic embedder), when
    given, replace the trigram similarities.
    """
    words = _WORD.findall(text)
    lower = [w.lower().strip(".") for w in words]
    bag = set(lower)
    stripped = text.strip()
    if stripped.endswith("?") or (
        lower and lower[0] in {"what", "how", "why", "when", "where", "who", "which", "can", "is", "are"}
    ):
        intent = "question"
    elif lower and lower[0] in _COMMAND:
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
    text_vec = trigram_vector(text) if vectors and similarities is None else {}
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
