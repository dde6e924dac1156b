"""Contracts of the reasoning plugin (msgspec and stdlib only).

Helios calls :class:`Reason` once per expert, in parallel. With ``stream=True`` and when
the call runs inside a job (helios's, calling in-process), partial output is appended to
that job's event stream as :class:`AnswerStreamed` events while the answer is produced.
"""

from __future__ import annotations

from aiwfe.kernel.contract import Event, Idempotent, Reply, Request

__all__ = ["AnswerStreamed", "Reason", "Reasoned"]


class Reasoned(Reply):
    """An answer with its confidence (0..1), token counts and latency.

    ``model``: the model that answered (empty for extractive); ``finish_reason``: the
    provider's (``stop``, ``length``...); ``attempts``: calls made, retries included.
    """

    answer: str
    confidence: float
    provider: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    model: str = ""
    finish_reason: str = ""
    attempts: int = 1


class Reason(Request[Reasoned], Idempotent, tag="reasoning.reason"):
    """Answer ``task`` in the voice of ``role`` from ``context``.

    ``latency_s`` (extractive provider only) overrides the configured simulated latency.
    ``options`` go to the model: ``temperature``, ``max_tokens``, ``top_p``, ``seed``, and
    ``model`` to override the configured model. ``stream``: emit :class:`AnswerStreamed`
    events when running inside a job (off by default: earlier callers saw no such events);
    ``label`` is echoed in them (e.g. the expert's name; empty: the role).
    """

    role: str
    task: str
    context: list[str] = []
    max_sentences: int = 3
    latency_s: float | None = None
    options: dict[str, float | int | str | bool] = {}
    stream: bool = False
    label: str = ""


class AnswerStreamed(Event, tag="reasoning.answer_streamed"):
    """A piece of an answer being produced, in order (``index`` from 0).

    ``attempt`` counts from 1; after a retry the pieces of the earlier attempt are void. A
    piece with ``index`` 0 starts the answer again: ``Reason`` is idempotent, so a call whose
    pod was lost mid-answer is sent once more to another replica, whose stream starts over
    (the reader drops what it had of that answer).
    ``done`` marks the last piece of an attempt that completed. ``label``: the Reason's.
    """

    role: str
    text: str
    index: int
    attempt: int = 1
    done: bool = False
    label: str = ""
