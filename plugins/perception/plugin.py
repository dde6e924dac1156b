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

Cost per call (hashing): what depends only on the config is computed at start-up (the tag
vectors and their inverted index, keyword → tags, stopword → languages, each tag's keyword
divisor); the text is tokenised once; each distinct word's trigrams and its per-tag partial
dot products are cached (bounded LRU, never whole texts), so a call sums a few cached
per-word values and counts the text's trigrams for the norm. Those sums are in another order
than :func:`analyse`'s, so they may differ in the last bits: when one is within that error of
a decision (the ``min_similarity`` floor, a rounding boundary of the 4-decimal score) the
call recomputes the similarities in analyse()'s order, so the answer is always analyse()'s.

LLM mode (``mode = "llm"``): the built-in analysis, plus one ``reasoning.reason`` call
asking a model which tags apply; a tag the model names scores at least
``llm_weight``. When the call fails the built-in result stands (never worse than built-in).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from aiwfe.kernel import AiwfeError, Plugin, serves
from aiwfe.kernel.config_check import one_of, problem_text
from aiwfe.kernel.errors import ConfigError
from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable
from aiwfe.plugins.reasoning.contract import Reason

from .contract import ExpertiseScore, Perceive, Perception
from .trigrams import (  # noqa: F401  (re-exported: tests and callers import them from here)
    _LOWER_JOINS,
    _WORD,
    CACHED_WORD_MAX,
    _approximate_similarities,
    _cached_trigrams,
    _cosine,
    _index_similarities,
    _tokens,
    _unit_vector,
    _unsure,
    _word_info,
    _word_trigrams,
    trigram_index,
    trigram_similarities,
    trigram_vector,
)

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
_QUESTION = {"what", "how", "why", "when", "where", "who", "which", "can", "is", "are"}
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
        self.table = _Table(config.expertise)
        self.words = _word_info(self.index)
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

    async def _similarities(self, text: str) -> dict[str, float]:
        """Semantic cosine of ``text`` to each tag's description (needs ``self.semantic``)."""
        assert self.semantic is not None
        (v,) = await self.semantic.embed([text])
        return {t: sum(a * b for a, b in zip(v, d, strict=True)) for t, d in self.dense.items()}

    @serves(Perceive, concurrency=256)
    async def perceive(self, req: Perceive) -> Perception:
        """Analyse the text (see the module docstring): one tokenisation of the text feeds both
        the similarities (hashing: per-word sums, exact ones when a decision is that close;
        semantic: the model's) and :func:`_analyse`, which gives what :func:`analyse` would."""
        c = self.config
        tokens = _tokens(req.text)
        if self.semantic is None:  # the trigram cosines, summed per word (see _approximate_similarities)
            floor = c.min_similarity
            sims, tolerance = _approximate_similarities(tokens[2], self.words, floor)
        else:
            floor = c.semantic_min_similarity
            sims, tolerance = await self._similarities(req.text), 0.0
        n = req.max_tags if c.mode == "builtin" else len(c.expertise)
        base = _analyse(req.text, tokens, self.table, n, c.similarity_weight, floor, sims, tolerance)
        if base is None:  # a decision within rounding error of a sum: the sums in analyse()'s order decide
            sims = _index_similarities(tokens[2], self.index)
            base = _analyse(req.text, tokens, self.table, n, c.similarity_weight, floor, sims)
            assert base is not None
        if c.mode == "builtin":
            return base
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


class _Table:
    """What analysing a text needs from an expertise table, computed once per table: each
    lower-cased keyword or stopword → the tags it is a keyword of (once per listing) and the
    languages it is a stopword of; each tag's keyword divisor ``min(3, len(keywords))``."""

    __slots__ = ("divisors", "roles")

    def __init__(self, expertise: dict[str, list[str]]) -> None:
        self.divisors = {tag: min(3, len(keywords)) for tag, keywords in expertise.items() if keywords}
        roles: dict[str, tuple[list[str], list[str]]] = {}
        for tag, keywords in expertise.items():
            for k in keywords:
                roles.setdefault(k.lower(), ([], []))[0].append(tag)
        for lang, stopwords in _STOPWORDS.items():
            for w in stopwords:
                roles.setdefault(w, ([], []))[1].append(lang)
        self.roles = {w: (tuple(tags), tuple(langs)) for w, (tags, langs) in roles.items()}


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
    only keywords count. ``similarities`` (tag → cosine, from a semantic embedder or
    :func:`trigram_similarities`), when given, replace the trigram similarities. (perceive
    itself calls :func:`_analyse` with its precomputed :class:`_Table`.)
    """
    tokens = _tokens(text)
    if similarities is not None:
        sims = {tag: sim for tag, sim in similarities.items() if sim is not None and tag in expertise}
    elif vectors:
        text_vec = _unit_vector(tokens[2])
        sims = {tag: _cosine(text_vec, vectors[tag]) for tag in expertise if tag in vectors}
    else:
        sims = {}
    perception = _analyse(text, tokens, _Table(expertise), max_tags, similarity_weight, min_similarity, sims)
    assert perception is not None  # None only with a tolerance
    return perception


def _analyse(
    text: str,
    tokens: tuple[list[str], list[str], list[str]],
    table: _Table,
    max_tags: int,
    similarity_weight: float,
    min_similarity: float,
    similarities: dict[str, float],
    tolerance: float = 0.0,
) -> Perception | None:
    """:func:`analyse` of ``text`` (``tokens`` = :func:`_tokens` of it) with the table of its
    expertise and tag → similarity for the tags of that expertise that have one.

    A tag scores the higher of ``min(1, hits / min(3, len(keywords)))`` (hits: its keywords
    among the words) and, when its similarity reaches ``min_similarity``, ``similarity_weight
    × similarity``; tags scoring 0 are left out. Looks up each distinct word once in the
    table instead of every keyword in the words.

    With ``tolerance`` > 0 (``similarities`` are only that close to analyse()'s), None when
    a similarity is close enough to a decision (:func:`_unsure`) that the answer could
    differ: the caller then passes the exact ones."""
    words, lower, _ = tokens
    first = lower[0] if lower else ""
    if text.rstrip().endswith("?") or first in _QUESTION:
        intent = "question"
    elif first in _COMMAND:
        intent = "command"
    else:
        intent = "statement"
    hits: dict[str, int] = {}
    langs: dict[str, int] = {}
    for keyword_of, stopword_of in filter(None, map(table.roles.get, set(lower))):
        for tag in keyword_of:
            hits[tag] = hits.get(tag, 0) + 1
        for lang in stopword_of:
            langs[lang] = langs.get(lang, 0) + 1
    # the language with the most stopwords among the words, English on a tie with it, else the first
    if len(langs) <= 1:
        language = next(iter(langs), "en")
    else:
        language = max(_STOPWORDS, key=lambda lang: (langs.get(lang, 0), lang == "en"))
    entities: list[str] = []
    previous = "."  # the first word counts as following a sentence's end
    for w in words:
        if (w[:1].isupper() and previous[-1:] not in ".!?") or w.isdigit():
            if w not in entities:
                entities.append(w.strip("."))
        previous = w
    divisors = table.divisors
    scores = {tag: min(1.0, n / divisors[tag]) for tag, n in hits.items()}
    lowest = min_similarity - tolerance
    for tag, sim in similarities.items():
        if sim >= lowest:
            if tolerance and _unsure(sim, min_similarity, similarity_weight, tolerance):
                return None
            if sim >= min_similarity:
                scores[tag] = max(scores.get(tag, 0.0), similarity_weight * sim)
    ranked = sorted((-round(score, 4), tag) for tag, score in scores.items() if score > 0)
    expertise = [ExpertiseScore(tag=tag, score=-neg) for neg, tag in ranked[: max(0, max_tags)]]
    return Perception(intent=intent, language=language, entities=entities, expertise=expertise)
