"""Expert roles (configuration, not code) and selection through an inverted index.

Selection costs only the experts a request's expertise tags touch: the index maps each
tag to the experts that list it, so scoring is O(tags × experts per tag), not the old
system's O(n²) matching of every expert against every requirement.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec

__all__ = ["DEFAULT_EXPERTS", "Expert", "ExpertIndex"]


class Expert(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One expert role. ``expertise`` maps a perception tag to how well it fits (0..1).
    ``latency_s``: simulated latency for the extractive provider (overrides the job's;
    tests and benchmarks of quorums)."""

    name: str
    role: str
    expertise: dict[str, float]
    prompt: str = "As the {role}, answer precisely: {task}"
    weight: float = 1.0
    timeout_s: float | None = None
    latency_s: float | None = None


def _e(name: str, role: str, **tags: float) -> Expert:
    return Expert(name=name, role=role, expertise=tags)


DEFAULT_EXPERTS: list[Expert] = [
    _e("architect", "software architect", architecture=1.0, backend=0.5, performance=0.3),
    _e("security", "security engineer", security=1.0, backend=0.3),
    _e("dba", "database administrator", database=1.0, performance=0.6),
    _e("performance", "performance engineer", performance=1.0, database=0.3, backend=0.3),
    _e("devops", "devops engineer", devops=1.0, architecture=0.3),
    _e("frontend", "frontend engineer", frontend=1.0, product=0.2),
    _e("backend", "backend engineer", backend=1.0, architecture=0.4, database=0.3),
    _e("data", "data engineer", data=1.0, database=0.4),
    _e("ml", "machine learning engineer", ml=1.0, data=0.5),
    _e("qa", "quality engineer", testing=1.0),
    _e("product", "product manager", product=1.0, writing=0.3),
    _e("writer", "technical writer", writing=1.0, product=0.3),
]


class ExpertIndex:
    """Inverted index expertise tag → experts.

    Raises:
        ValueError: two experts share a name.
    """

    def __init__(self, experts: list[Expert]) -> None:
        self.experts = {e.name: e for e in experts}
        if len(self.experts) != len(experts):
            raise ValueError("expert names must be unique")
        self.by_tag: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for e in experts:
            for tag, fit in e.expertise.items():
                self.by_tag[tag].append((e.name, fit))

    def select(self, tags: dict[str, float], quality: dict[str, float], k: int, fallback: list[str]) -> list[tuple[str, float]]:
        """Top ``k`` experts by Σ(tag score × fit) × weight × learned quality (default 1).

        Returns (name, relevance) pairs, best first; ``fallback`` experts when no tag matches.
        """
        score: dict[str, float] = defaultdict(float)
        for tag, s in tags.items():
            for name, fit in self.by_tag.get(tag, ()):
                score[name] += s * fit
        if not score:
            return [(n, 1.0) for n in fallback if n in self.experts][: max(0, k)]
        ranked = sorted(
            ((n, v * self.experts[n].weight * quality.get(n, 1.0)) for n, v in score.items()),
            key=lambda p: (-p[1], p[0]),
        )
        return ranked[: max(0, k)]
