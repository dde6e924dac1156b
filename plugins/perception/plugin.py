"""perception plugin: keyword analysis against expertise descriptions from config.

Built-in mode only for now: intent from the sentence form, language from stopwords,
entities from capitalised words and numbers, expertise tags scored by the share of a
tag's keywords found in the text. Deterministic and free of I/O.
"""

from __future__ import annotations

import re

import msgspec

from kernel import Plugin, serves

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

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """``expertise`` maps a tag to its keywords (replaces the built-in table when set)."""

        expertise: dict[str, list[str]] = msgspec.field(default_factory=lambda: dict(_DEFAULT_EXPERTISE))

    config: Config

    @serves(Perceive, concurrency=256)
    async def perceive(self, req: Perceive) -> Perception:
        """Analyse the text (see the module docstring)."""
        return analyse(req.text, self.config.expertise, req.max_tags)


def analyse(text: str, expertise: dict[str, list[str]], max_tags: int) -> Perception:
    """Pure function behind :meth:`PerceptionPlugin.perceive`."""
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
    for tag, keywords in expertise.items():
        if not keywords:
            continue
        hits = sum(1 for k in keywords if k.lower() in bag)
        if hits:
            scores.append(ExpertiseScore(tag=tag, score=round(min(1.0, hits / min(3, len(keywords))), 4)))
    scores.sort(key=lambda s: (-s.score, s.tag))
    return Perception(intent=intent, language=language, entities=entities, expertise=scores[: max(0, max_tags)])
