"""Contracts of the helios plugin (msgspec and stdlib only).

A request is a durable job, ``helios.ask``; its progress is a stream of events on the
job's event subject, in this order: ``helios.perceived``, ``helios.selected``, per expert
``helios.expert_started`` then one of ``helios.expert_answered`` /
``helios.expert_failed`` / ``helios.expert_timed_out`` (as each lands, so interleaved),
``helios.synthesis_delta`` chunks, then the kernel's ``job.done`` carrying the
:class:`Synthesis` (or ``job.failed`` with the reasons when no expert answered).
"""

from __future__ import annotations

from aiwfe.kernel.contract import Event, Job, Reply

__all__ = [
    "Ask",
    "ExpertAnswer",
    "ExpertAnswered",
    "ExpertFailed",
    "ExpertStarted",
    "ExpertTimedOut",
    "Perceived",
    "Selected",
    "Synthesis",
    "SynthesisDelta",
]


class ExpertAnswer(Reply):
    """One expert's outcome. ``status``: ``answered``, ``failed`` or ``timed_out``."""

    expert: str
    status: str
    answer: str = ""
    confidence: float = 0.0
    weight: float = 0.0
    latency_ms: float = 0.0
    cached: bool = False
    error: str = ""


class Synthesis(Reply):
    """The result of a helios job."""

    answer: str
    confidence: float
    experts: list[ExpertAnswer] = []
    elapsed_ms: float = 0.0


class Ask(Job[Synthesis], tag="helios.ask"):
    """Ask the experts. ``owner`` scopes the memory recall (the gateway sets it to the user).

    ``max_experts``: how many experts to consult (top by relevance × learned quality).
    ``deadline_s``: budget for the whole job; each expert gets ``expert_timeout_s``
    (default: the plugin's) inside it, leaving room for synthesis and storage.
    ``latency_s``: simulated latency for the extractive provider (benchmarks, tests).
    """

    text: str
    owner: str = ""
    max_experts: int = 4
    deadline_s: float = 60.0
    expert_timeout_s: float | None = None
    use_cache: bool = True
    latency_s: float | None = None


class Perceived(Event, tag="helios.perceived"):
    intent: str
    expertise: dict[str, float] = {}


class Selected(Event, tag="helios.selected"):
    experts: list[str]


class ExpertStarted(Event, tag="helios.expert_started"):
    expert: str
    budget_s: float


class ExpertAnswered(Event, tag="helios.expert_answered"):
    expert: str
    answer: str
    confidence: float
    cached: bool = False
    latency_ms: float = 0.0


class ExpertFailed(Event, tag="helios.expert_failed"):
    expert: str
    reason: str


class ExpertTimedOut(Event, tag="helios.expert_timed_out"):
    expert: str
    budget_s: float


class SynthesisDelta(Event, tag="helios.synthesis_delta"):
    text: str
