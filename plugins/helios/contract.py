"""Contracts of the helios plugin (msgspec and stdlib only).

A request is a durable job, ``helios.ask``; its progress is a stream of events on the
job's event subject, in this order: ``helios.perceived``, ``helios.selected``, per expert
``helios.expert_started`` then one of ``helios.expert_answered`` /
``helios.expert_failed`` / ``helios.expert_timed_out`` (as each lands, so interleaved),
``helios.expert_cancelled`` for the experts still running when ``min_answers`` were reached,
``helios.expert_skipped`` for an expert whose call the job's token budget could not cover,
``helios.synthesis_delta`` chunks, then the kernel's ``job.done`` carrying the
:class:`Synthesis` (or ``job.failed`` with the reasons when no expert answered).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from aiwfe.kernel.contract import Event, Job, Reply

__all__ = [
    "Ask",
    "ExpertAnswer",
    "ExpertAnswered",
    "ExpertCancelled",
    "ExpertFailed",
    "ExpertSkipped",
    "ExpertStarted",
    "ExpertTimedOut",
    "Perceived",
    "Selected",
    "Synthesis",
    "SynthesisDelta",
]


class ExpertAnswer(Reply):
    """One expert's outcome. ``status``: ``answered``, ``failed``, ``timed_out``,
    ``cancelled`` (still running when ``min_answers`` were reached) or ``skipped`` (its
    call was never started: the token budget could not cover it).

    ``tokens``: what the call spent (prompt + completion as the provider reported them;
    a cancelled call is charged its reservation's prompt part, a cache hit or a skip 0).
    """

    expert: str
    status: str
    answer: str = ""
    confidence: float = 0.0
    weight: float = 0.0
    latency_ms: float = 0.0
    cached: bool = False
    error: str = ""
    tokens: int = 0


class Synthesis(Reply):
    """The result of a helios job.

    ``min_answers`` and ``token_budget``: the values the job ran with (after the server's
    caps); ``tokens_spent``: the sum of the experts' ``tokens``.
    """

    answer: str
    confidence: float
    experts: list[ExpertAnswer] = []
    elapsed_ms: float = 0.0
    min_answers: int = 0
    token_budget: int = 0
    tokens_spent: int = 0


class Ask(Job[Synthesis], tag="helios.ask"):
    """Ask the experts. ``owner`` scopes the memory recall (the gateway sets it to the user).

    ``max_experts``: how many experts to consult (top by relevance × learned quality).
    ``deadline_s``: budget for the whole job; each expert gets ``expert_timeout_s``
    (default: the plugin's) inside it, leaving room for synthesis and storage.
    ``latency_s``: simulated latency for the extractive provider (benchmarks, tests).
    ``min_answers``: synthesise as soon as this many experts have answered and cancel the
    rest (0 or less: wait for every expert; capped at the number selected).
    ``token_budget``: tokens the job may spend across its experts (0 or less: the plugin's
    ``default_token_budget``); capped at the plugin's ``max_token_budget``. Each expert
    call reserves its prompt estimate plus its completion cap before it starts; a call the
    remaining budget cannot cover is not started.

    ``input_caps``: the largest values a client may send (the server's caps, checked where
    the job is submitted from outside; the manifest's ``[system.jobs."helios.ask"].caps``
    overrides them): a job of 6 experts, 120 s, 30 s per expert, 200,000 tokens, a quorum
    of at most its experts; ``latency_s`` 0, so a client's simulated latency is refused
    unless a manifest for tests and benchmarks raises that cap (e.g. ``latency_s = 60``).
    ``max_jobs_per_owner``: unfinished ``helios.ask`` jobs per user (the manifest's
    ``max_per_owner`` overrides it): 8 jobs × 6 experts stay below reasoning's 64 calls.
    """

    max_jobs_per_owner: ClassVar[int] = 8

    input_caps: ClassVar[Mapping[str, float | str]] = {
        "max_experts": 6,
        "deadline_s": 120.0,
        "expert_timeout_s": 30.0,
        "token_budget": 200_000,
        "min_answers": "max_experts",
        "latency_s": 0.0,
    }

    text: str
    owner: str = ""
    max_experts: int = 4
    deadline_s: float = 60.0
    expert_timeout_s: float | None = None
    use_cache: bool = True
    latency_s: float | None = None
    min_answers: int = 0
    token_budget: int = 0


class Perceived(Event, tag="helios.perceived"):
    intent: str
    expertise: dict[str, float] = {}


class Selected(Event, tag="helios.selected"):
    experts: list[str]
    min_answers: int = 0
    token_budget: int = 0


class ExpertStarted(Event, tag="helios.expert_started"):
    expert: str
    budget_s: float
    tokens_reserved: int = 0


class ExpertAnswered(Event, tag="helios.expert_answered"):
    expert: str
    answer: str
    confidence: float
    cached: bool = False
    latency_ms: float = 0.0
    tokens: int = 0


class ExpertFailed(Event, tag="helios.expert_failed"):
    expert: str
    reason: str


class ExpertTimedOut(Event, tag="helios.expert_timed_out"):
    expert: str
    budget_s: float


class ExpertCancelled(Event, tag="helios.expert_cancelled"):
    expert: str
    reason: str


class ExpertSkipped(Event, tag="helios.expert_skipped"):
    expert: str
    reason: str
    tokens_left: int = 0


class SynthesisDelta(Event, tag="helios.synthesis_delta"):
    text: str
