"""reasoning plugin: LLM calls through providers (DESIGN.md §4).

Providers: ``extractive`` (built in, not a language model: it ranks the sentences of the
context by word overlap with the task and role and returns the best ones in their
original order, deterministically; ``latency_s`` simulates a model's latency so that
timing tests are meaningful), ``ollama`` and ``openai`` (any OpenAI-compatible server),
see :mod:`aiwfe.plugins.reasoning.providers`.

Every provider call holds one of ``max_concurrency`` slots (exported as the
``aiwfe_active_llm_requests{provider}`` gauge); calls waiting for one are served by whom
they act for in turn (a job's owner, a gateway user), and the last ``reserved_slots`` free
slots are kept for owners running fewer calls than that (:class:`aiwfe.kernel.Limiter`): accounts flooding with long
calls do not hold up another user's call. A call is retried on retryable errors, up to
``max_attempts`` calls, after ``backoff_s[attempt - 1]`` seconds (+ up to 25 % jitter;
the last value repeats), never past the caller's deadline.

Streaming: when the call runs inside a job (``aiwfe.kernel.current_job()``, e.g. helios's job
calling Reason in-process), partial output is appended to the job's events as
:class:`AnswerStreamed`, coalesced every ``stream_interval_ms``. :meth:`ReasoningPlugin.stream`
yields the same pieces to an in-process caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import Gauge

from aiwfe.kernel import ConfigError, Limiter, Plugin, current_deadline, current_job, current_owner, serves
from aiwfe.kernel.config_check import one_of, problem_text
from aiwfe.kernel.errors import BadInput
from aiwfe.kernel.metrics import REGISTRY

from .contract import AnswerStreamed, Reason, Reasoned
from .providers import ChatResult, OllamaProvider, OpenAIProvider, ProviderError

__all__ = ["ACTIVE_LLM_REQUESTS", "ReasoningPlugin", "extract", "parse_confidence"]

ACTIVE_LLM_REQUESTS = Gauge(
    "aiwfe_active_llm_requests", "LLM provider calls in flight in this pod", ["provider"], registry=REGISTRY
)

_SENT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"the", "a", "an", "and", "or", "of", "to", "in", "is", "are", "for", "on", "with", "it", "this", "that", "be", "as"}
_CONFIDENCE = re.compile(r"\s*\(?\bconfidence\s*[:=]\s*([0-9]*\.?[0-9]+)\s*(%?)\)?\s*\.?\s*$", re.IGNORECASE)
PROVIDERS = ("extractive", "ollama", "openai")
_DEFAULT_URL = {"ollama": "http://127.0.0.1:11434", "openai": "https://api.openai.com"}
_URL_ENV = {"ollama": "OLLAMA_URL", "openai": "OPENAI_BASE_URL"}

Sink = Callable[[str, bool, int], Awaitable[None]]


class ReasoningPlugin(Plugin):
    """Serves ``reasoning.reason``."""

    name = "reasoning"

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """Configuration.

        ``provider``: ``extractive``, ``ollama`` or ``openai``. ``latency_s``: simulated
        latency per extractive call; ``max_latency_s``: the most a caller's ``Reason.latency_s``
        may ask for (a longer one is refused with ``BadInput``: a sleep holds a provider slot).
        Clients reach it only through helios, whose edge refuses ``latency_s`` unless the
        manifest raises its cap (README "Limits and fair share"). ``max_concurrency``: provider calls in flight per pod.
        ``reserved_slots``: of those, the last free ones kept for owners running fewer calls
        than that (-1: ``max_concurrency // 8``; 0: none; :class:`aiwfe.kernel.Limiter`).
        ``base_url`` (empty: ``OLLAMA_URL`` / ``OPENAI_BASE_URL``, else the provider's
        default), ``model``, ``api_key`` (empty: ``OPENAI_API_KEY``). ``connect_timeout_s``,
        ``read_timeout_s`` (per chunk). ``max_attempts`` and ``backoff_s``: retries.
        ``temperature``, ``max_tokens``: defaults for ``Reason.options``.
        ``default_confidence``: when the model states none. ``stream_interval_ms``:
        how often partial output is emitted. ``system_prompt``: ``{role}`` is substituted.
        """

        provider: str = "extractive"
        latency_s: float = 0.0
        max_latency_s: float = 60.0
        max_concurrency: int = 64
        reserved_slots: int = -1
        base_url: str = ""
        model: str = ""
        api_key: str = ""
        connect_timeout_s: float = 5.0
        read_timeout_s: float = 60.0
        max_attempts: int = 3
        backoff_s: tuple[float, ...] = (0.5, 2.0)
        temperature: float = 0.2
        max_tokens: int = 512
        default_confidence: float = 0.5
        stream_interval_ms: float = 50.0
        system_prompt: str = (
            "You are the {role} expert. Answer the task using the context where it helps; be concise. "
            "End with a last line 'Confidence: <a number from 0 to 1>'."
        )

    config: Config

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """``provider`` one of :data:`PROVIDERS`; ``model`` set for the HTTP providers; positive limits."""
        problems = one_of("provider", config.provider, PROVIDERS)
        if config.provider in _DEFAULT_URL and not config.model:
            problems.append(f"model: provider {config.provider} needs `model`")
        for field in ("max_concurrency", "max_attempts", "max_tokens"):
            if getattr(config, field) < 1:
                problems.append(f"{field}: must be at least 1, not {getattr(config, field)}")
        if not -1 <= config.reserved_slots < max(1, config.max_concurrency):
            problems.append(f"reserved_slots: -1 (default), 0 or below max_concurrency, not {config.reserved_slots}")
        if any(b < 0 for b in config.backoff_s):
            problems.append(f"backoff_s: delays must not be negative, not {list(config.backoff_s)}")
        return problems

    def __init__(self, config: Config, kernel: object) -> None:
        problems = self.validate_config(config)
        if problems:
            raise ConfigError("reasoning: " + "; ".join(map(problem_text, problems)))
        super().__init__(config, kernel)  # type: ignore[arg-type]
        # Fair between whom the calls act for (aiwfe.kernel.Limiter); the queue holds at most
        # the endpoint's concurrency less these slots, so it is never refused here.
        reserve = config.max_concurrency // 8 if config.reserved_slots < 0 else config.reserved_slots
        self._slots = Limiter("reasoning provider slots", config.max_concurrency, 1 << 20, reserve)
        self._active = ACTIVE_LLM_REQUESTS.labels(config.provider)
        self._client: OllamaProvider | OpenAIProvider | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the provider's HTTP client (none for extractive)."""
        c = self.config
        if c.provider != "extractive":
            base = c.base_url or os.environ.get(_URL_ENV[c.provider], "") or _DEFAULT_URL[c.provider]
            key = c.api_key or (os.environ.get("OPENAI_API_KEY", "") if c.provider == "openai" else "")
            cls = OllamaProvider if c.provider == "ollama" else OpenAIProvider
            self._client = cls(base, c.model, api_key=key, connect_timeout_s=c.connect_timeout_s, read_timeout_s=c.read_timeout_s)
        try:
            yield
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    # timeout_s is also the cap on any caller's deadline: a real LLM answer may take
    # minutes, so callers (helios experts) may ask for up to 120 s here.
    @serves(Reason, concurrency=256, max_queue=4096, timeout_s=120.0)
    async def reason(self, req: Reason) -> Reasoned:
        """Answer with the configured provider; inside a job, stream partial output as events.

        Raises:
            ProviderError: the provider failed (``retryable`` as classified), after retries.
        """
        job = current_job()
        sink: Sink | None = None
        if job is not None and req.stream:
            sink = _JobSink(job.emit, req.role, req.label or req.role, self.config.stream_interval_ms / 1000.0).put
        return await self._answer(req, sink)

    async def stream(self, req: Reason) -> AsyncIterator[str | Reasoned]:
        """Yield pieces of the answer as they arrive, then the :class:`Reasoned` (in-process use).

        After a retry the pieces start again from the beginning of the answer.
        """
        queue: asyncio.Queue[str | Reasoned | BaseException] = asyncio.Queue()

        async def put(text: str, done: bool, attempt: int) -> None:
            if text:
                queue.put_nowait(text)

        async def run() -> None:
            try:
                queue.put_nowait(await self._answer(req, put))
            except BaseException as e:
                queue.put_nowait(e)

        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Reasoned):
                    return
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _answer(self, req: Reason, sink: Sink | None) -> Reasoned:
        t0 = time.perf_counter()
        if self.config.provider == "extractive":
            if req.latency_s is not None and req.latency_s > self.config.max_latency_s:
                cap = self.config.max_latency_s
                raise BadInput(f"reasoning.reason: latency_s = {req.latency_s:g} is over its cap ({cap:g}, max_latency_s)")
            # the slot as in _slot(), without a generator-based context manager per call
            slots, active = self._slots, self._active
            owner = current_owner()  # whom the call acts for: the provider slots are shared fairly by it
            await slots.enter(owner)
            try:
                active.inc()
                try:
                    latency = self.config.latency_s if req.latency_s is None else req.latency_s
                    if latency > 0:
                        await asyncio.sleep(latency)
                    answer, confidence = extract(req.role, req.task, req.context, req.max_sentences)
                finally:
                    active.dec()
            finally:
                slots.leave(owner)
            if sink is not None:
                await sink(answer, True, 1)
            prompt_tokens = sum(len(_WORD.findall(s.lower())) for s in [req.role, req.task, *req.context])
            return Reasoned(
                answer=answer,
                confidence=confidence,
                provider="extractive",
                prompt_tokens=prompt_tokens,
                completion_tokens=len(_WORD.findall(answer.lower())),
                latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            )
        result, attempts = await self._chat_with_retries(req, sink)
        answer, confidence = parse_confidence(result.text, self.config.default_confidence)
        return Reasoned(
            answer=answer,
            confidence=confidence,
            provider=self.config.provider,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            model=result.model,
            finish_reason=result.finish_reason,
            attempts=attempts,
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        owner = current_owner()  # whom the call acts for: the provider slots are shared fairly by it
        await self._slots.enter(owner)
        try:
            self._active.inc()
            try:
                yield
            finally:
                self._active.dec()
        finally:
            self._slots.leave(owner)

    def messages(self, req: Reason) -> list[dict[str, str]]:
        """The chat messages sent for ``req``: a system prompt and one user message."""
        context = "\n".join(f"{i}. {c}" for i, c in enumerate(req.context, 1))
        user = (f"Context:\n{context}\n\n" if context else "") + f"Task: {req.task}"
        return [{"role": "system", "content": self.config.system_prompt.format(role=req.role)}, {"role": "user", "content": user}]

    async def _chat_with_retries(self, req: Reason, sink: Sink | None) -> tuple[ChatResult, int]:
        c = self.config
        assert self._client is not None, "reasoning: provider used outside the plugin's lifespan"
        options: dict[str, Any] = {"temperature": c.temperature, "max_tokens": c.max_tokens, **req.options}
        messages = self.messages(req)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            on_delta = _null_delta if sink is None else _attempt_sink(sink, attempt)
            try:
                async with self._slot():
                    result = await self._client.chat(messages, options, on_delta)
                if sink is not None:
                    await sink("", True, attempt)
                return result, attempt
            except ProviderError as e:
                if not e.retryable or attempt >= c.max_attempts or not c.backoff_s:
                    raise
                delay = c.backoff_s[min(attempt, len(c.backoff_s)) - 1] * (1 + 0.25 * random.random())
                deadline = current_deadline()
                if deadline is not None and loop.time() + delay >= deadline:
                    raise
                await asyncio.sleep(delay)


async def _null_delta(text: str) -> None:
    return None


def _attempt_sink(sink: Sink, attempt: int) -> Callable[[str], Awaitable[None]]:
    async def on_delta(text: str) -> None:
        await sink(text, False, attempt)

    return on_delta


class _JobSink:
    """Coalesces pieces into AnswerStreamed events on the running job, every ``interval_s``."""

    def __init__(self, emit: Callable[[msgspec.Struct], Awaitable[int]], role: str, label: str, interval_s: float) -> None:
        self._emit = emit
        self._role = role
        self._label = label
        self._interval_s = interval_s
        self._buf: list[str] = []
        self._index = 0
        self._attempt = 1
        self._last = 0.0

    async def put(self, text: str, done: bool, attempt: int) -> None:
        """Buffer ``text`` of ``attempt``; emit when the interval passed or ``done``.

        The first piece of a new attempt drops what is buffered of the previous one.
        """
        if attempt != self._attempt:
            self._attempt, self._index = attempt, 0
            self._buf.clear()
        if text:
            self._buf.append(text)
        now = time.monotonic()
        if not done and now - self._last < self._interval_s:
            return
        if self._buf or done:
            await self._emit(
                AnswerStreamed(
                    role=self._role,
                    text="".join(self._buf),
                    index=self._index,
                    attempt=self._attempt,
                    done=done,
                    label=self._label,
                )
            )
            self._index += 1
            self._buf.clear()
            self._last = now


def parse_confidence(text: str, default: float) -> tuple[str, float]:
    """Split a trailing ``Confidence: 0.8`` (or ``80%``) off ``text``; return (answer, confidence).

    ``default`` when the text states none; the value is clamped to 0..1.
    """
    m = _CONFIDENCE.search(text)
    if not m:
        return text.strip(), default
    value = float(m.group(1)) / (100.0 if m.group(2) or float(m.group(1)) > 1 else 1.0)
    return text[: m.start()].strip(), round(min(1.0, max(0.0, value)), 4)


def _terms(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def extract(role: str, task: str, context: list[str], max_sentences: int) -> tuple[str, float]:
    """Rank context sentences by overlap with task and role; return (answer, confidence)."""
    sentences = [s.strip() for chunk in context for s in _SENT.split(chunk) if s.strip()]
    if not sentences:  # nothing to rank: the query's terms are not needed
        return (f"[{role}] No context to answer: {task}", 0.0)
    query = _terms(task) | _terms(role)
    if not query:
        return (f"[{role}] No context to answer: {task}", 0.0)
    scored = []
    for i, s in enumerate(sentences):
        terms = _terms(s)
        overlap = len(terms & query) / len(query)
        scored.append((overlap, -i, s))
    best = sorted(scored, reverse=True)[: max(1, max_sentences)]
    best = [b for b in best if b[0] > 0] or best[:1]
    chosen = sorted(best, key=lambda b: -b[1])
    confidence = round(sum(b[0] for b in chosen) / len(chosen), 4)
    return (" ".join(b[2] for b in chosen), confidence)
