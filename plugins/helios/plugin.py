"""helios plugin: the expert coordinator.

One ``helios.ask`` job goes: perception (which expertise is needed) and one shared
memory recall, in parallel → selection from the inverted expertise index, weighted by
learned quality → **all selected experts in parallel** through reasoning, each with its
own budget inside the job's deadline, their partial output streamed as
``reasoning.answer_streamed`` events → an event per expert as it lands → synthesis
weighted by confidence × relevance × learned quality, streamed as deltas → one database
transaction for all answers and the synthesis → the result (recorded once by the kernel).

``min_answers`` (quorum): once that many experts have answered, the rest are cancelled
and recorded as ``cancelled``. A per-job token budget (:mod:`.budget`) is reserved
before each expert call; a call it cannot cover is not started (``skipped``). Spend is
reported per expert and in total.

Failed and late experts are reported and the rest still count. A job with no answer at
all is retried (``ExpertsUnavailable``, retryable: the kernel naks it with backoff) when an
expert failed for an infrastructure reason — its pod lost mid-call, unavailable or
overloaded, any error its raiser marked retryable but a timeout — since another attempt
may reach a live replica; when every expert failed for a reason that would repeat (a
content error, a timeout within its budget, the token budget) it fails with the reasons
(``NoAnswers``, final). Cancelling
the job (client cancel, or a disconnect when the client asked for it) cancels the
expert calls in flight. Identical expert prompts hit the Redis cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

import msgspec
from prometheus_client import Histogram

from aiwfe.kernel import AiwfeError, DeadlineExceeded, Plugin, current_deadline, current_job, serves
from aiwfe.kernel.metrics import REGISTRY
from aiwfe.plugins.learning.contract import ExpertScores
from aiwfe.plugins.memory.contract import Recall
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.reasoning.contract import Reason

from .budget import TokenBudget, estimate_tokens
from .cache import AnswerCache
from .contract import (
    Ask,
    ExpertAnswer,
    ExpertAnswered,
    ExpertCancelled,
    ExpertFailed,
    ExpertSkipped,
    ExpertStarted,
    ExpertTimedOut,
    Perceived,
    Selected,
    Synthesis,
    SynthesisDelta,
)
from .experts import DEFAULT_EXPERTS, Expert, ExpertIndex
from .quorum import until_quorum
from .store import RunStore, database_url
from .synthesis import SENTENCE_BREAK, synthesise

__all__ = ["ExpertsUnavailable", "HeliosPlugin", "NoAnswers", "synthesise"]

log = logging.getLogger("aiwfe.helios")
WARN_EVERY_S = 60.0  # a warning about an unavailable optional service, at most this often (per kind)
JOB_SECONDS = Histogram(
    "aiwfe_helios_job_seconds",
    "Helios processing time per job, by outcome",
    ["outcome"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120),
    registry=REGISTRY,
)


class NoAnswers(Exception):
    """No expert answered, for reasons another attempt would meet again; the message lists
    why each one did not."""

    retryable = False


class ExpertsUnavailable(Exception):
    """No expert answered and at least one failed for an infrastructure reason (its pod
    lost, unavailable or overloaded): the job is retried."""

    retryable = True


def _infrastructure(err: AiwfeError) -> bool:
    """True for a failure another attempt may not meet: a lost or unreachable pod
    (``Unavailable``, ``PeerLost``), ``Overloaded``, any error marked retryable but a timeout
    (an expert slower than its budget would be as slow again)."""
    return err.retryable and not isinstance(err, DeadlineExceeded)


class HeliosPlugin(Plugin):
    """Serves the ``helios.ask`` job."""

    name = "helios"
    calls = (Perceive, Reason, Recall, ExpertScores)
    services = ("postgres", "redis")

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        """``experts``: the roles (twelve by default); ``fallback_experts`` answer when no
        expertise tag matches. ``expert_timeout_s``: default budget per expert;
        ``synthesis_reserve_s``: time kept back from the deadline for synthesis and storage.
        ``database_url`` / ``redis_url``: empty → ``DATABASE_URL`` / ``REDIS_URL``; with
        neither, runs are not stored / answers not cached (logged at start).
        ``llm_provider`` / ``llm_model`` are part of the cache key: set them to what the
        reasoning plugin runs.

        Token budgets: a job's ``token_budget`` defaults to ``default_token_budget`` and
        is capped at ``max_token_budget``; each expert call reserves its prompt estimate
        plus ``expert_max_tokens`` (sent to the model as ``max_tokens``; less when less is
        left, down to ``min_completion_tokens``, below which the call is not started)."""

        experts: list[Expert] = msgspec.field(default_factory=lambda: list(DEFAULT_EXPERTS))
        fallback_experts: list[str] = msgspec.field(default_factory=lambda: ["architect", "writer"])
        expert_timeout_s: float = 30.0
        recall_k: int = 5
        synthesis_reserve_s: float = 0.5
        max_synthesis_sentences: int = 6
        database_url: str = ""
        redis_url: str = ""
        cache_prefix: str = "aiwfe:helios:"
        cache_ttl_s: float = 3600.0
        llm_provider: str = "extractive"
        llm_model: str = ""
        pool_max: int = 10
        default_token_budget: int = 20_000
        max_token_budget: int = 200_000
        expert_max_tokens: int = 512
        min_completion_tokens: int = 16

    config: Config

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        """Unique expert names; ``fallback_experts`` among them; positive budgets."""
        names = [e.name for e in config.experts]
        problems: list[str | tuple[str, str]] = []
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"experts: names used more than once: {', '.join(twice)}")
        problems += [
            f"fallback_experts: {n!r} is not an expert ({', '.join(names)})" for n in config.fallback_experts if n not in names
        ]
        if config.expert_timeout_s <= 0:
            problems.append(f"expert_timeout_s: must be positive, not {config.expert_timeout_s}")
        if config.recall_k < 0:
            problems.append(f"recall_k: must not be negative, not {config.recall_k}")
        for field in ("default_token_budget", "max_token_budget", "expert_max_tokens", "min_completion_tokens"):
            if getattr(config, field) <= 0:
                problems.append(f"{field}: must be positive, not {getattr(config, field)}")
        if config.default_token_budget > config.max_token_budget:
            problems.append(
                f"default_token_budget: {config.default_token_budget} is above max_token_budget {config.max_token_budget}"
            )
        return problems

    def __init__(self, config: Config, kernel: object) -> None:
        super().__init__(config, kernel)  # type: ignore[arg-type]
        self.index = ExpertIndex(config.experts)
        self.cache: AnswerCache | None = None
        self.store: RunStore | None = None
        self._warned: dict[str, tuple[float, int]] = {}  # _warn: what -> (monotonic time logged, not logged since)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Open the run store (migrations applied) and the answer cache."""
        import os

        db = database_url(self.config.database_url)
        if db:
            self.store = RunStore(db, pool_max=self.config.pool_max)
            await self.store.open()
        else:
            log.warning("helios: no DATABASE_URL; runs are not stored")
        redis_url = self.config.redis_url or os.environ.get("REDIS_URL", "")
        self.cache = AnswerCache(redis_url, self.config.cache_prefix, self.config.cache_ttl_s)
        if not redis_url:
            log.warning("helios: no REDIS_URL; expert answers are not cached")
        try:
            yield
        finally:
            if self.store is not None:
                await self.store.close()
            await self.cache.close()

    @serves(Ask, concurrency=512, max_queue=8192, timeout_s=3600.0, ack_wait_s=10.0, max_deliver=3, backoff_s=(1.0, 5.0))
    async def ask(self, job: Ask) -> Synthesis:
        """Run one helios request (see the module docstring).

        Raises:
            NoAnswers: no expert answered.
        """
        t0 = time.perf_counter()
        ctx = current_job()
        assert ctx is not None, "helios.ask runs as a job"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.deadline_s
        outer = current_deadline()
        if outer is not None:
            deadline = min(deadline, outer)
        try:
            # Perception and the one shared memory recall do not depend on each other.
            perceive = Perceive(text=job.text, max_tags=len(self.index.by_tag))
            perception, context = await asyncio.gather(
                self.kernel.call(perceive, timeout_s=max(0.01, deadline - loop.time())),
                self._recall(job, deadline),
            )
            tags = {e.tag: e.score for e in perception.expertise}
            await ctx.emit(Perceived(intent=perception.intent, expertise=tags))
            candidates = self.index.select(tags, {}, len(self.index.experts), self.config.fallback_experts)
            quality = await self._quality([n for n, _ in candidates], list(tags), deadline)
            chosen = self.index.select(tags, quality, job.max_experts, self.config.fallback_experts)
            # Server-side caps: a quorum of at most the experts selected, a budget of at most max_token_budget.
            quorum = min(max(0, job.min_answers), len(chosen))
            asked = job.token_budget if job.token_budget > 0 else self.config.default_token_budget
            budget = TokenBudget(min(asked, self.config.max_token_budget))
            await ctx.emit(Selected(experts=[n for n, _ in chosen], min_answers=quorum, token_budget=budget.total))
            infra: set[str] = set()  # experts that failed for an infrastructure reason
            answers = await self._fan_out(job, chosen, context, deadline, quorum, budget, infra)
            result = await self._synthesise(answers, t0, quorum, budget)
            if not any(a.status == "answered" for a in answers):
                reasons = "; ".join(f"{a.expert}: {a.status} {a.error}".strip() for a in answers) or "no expert selected"
                lost = [a.expert for a in answers if a.expert in infra]
                if lost:
                    raise ExpertsUnavailable(f"no expert answered; {', '.join(lost)} could not be reached ({reasons})")
                raise NoAnswers(f"no expert answered ({reasons})")
            if self.store is not None:
                await self.store.save(ctx.job_id, job.owner, job.text, result)
        except BaseException as e:
            JOB_SECONDS.labels("cancelled" if isinstance(e, asyncio.CancelledError) else "failed").observe(
                time.perf_counter() - t0
            )
            raise
        JOB_SECONDS.labels("done").observe(time.perf_counter() - t0)
        return result

    async def _recall(self, job: Ask, deadline: float) -> list[str]:
        """The shared context: the owner's memories closest to the question (empty when
        memory is unavailable; the experts still answer, without context)."""
        if self.config.recall_k <= 0:
            return []
        timeout_s = max(0.01, min(2.0, deadline - asyncio.get_running_loop().time()))
        try:
            r = await self.kernel.call(
                Recall(query=job.text, owner=job.owner, k=self.config.recall_k), timeout_s=timeout_s, optional=True
            )
        except AiwfeError as e:
            self._warn("recall", "helios: memory recall failed (%s); experts answer without context", e)
            return []
        return [h.text for h in r.hits]

    def _warn(self, what: str, msg: str, e: AiwfeError) -> None:
        """Log a degraded job at most once per :data:`WARN_EVERY_S` per ``what``, with how many
        more there were: a manifest without memory or learning meets this on every job (a log
        line per job was ~3 % of the CPU of ``aiwfe bench helios --concurrent 1000``)."""
        now = time.monotonic()
        last, quiet = self._warned.get(what, (-WARN_EVERY_S, 0))
        if now - last < WARN_EVERY_S:
            self._warned[what] = (last, quiet + 1)
            return
        self._warned[what] = (now, 0)
        if quiet:
            msg += f" ({quiet} more since the last such warning)"
        log.warning(msg, e)

    async def _quality(self, experts: list[str], expertise: list[str], deadline: float) -> dict[str, float]:
        """Learned quality per expert (empty when learning is unavailable: all count alike)."""
        if not experts:
            return {}
        timeout_s = max(0.01, min(1.0, deadline - asyncio.get_running_loop().time()))
        try:
            r = await self.kernel.call(ExpertScores(experts=experts, expertise=expertise), timeout_s=timeout_s, optional=True)
        except AiwfeError as e:
            self._warn("scores", "helios: expert scores unavailable (%s); experts weighted alike", e)
            return {}
        return r.scores

    async def _fan_out(
        self,
        job: Ask,
        chosen: list[tuple[str, float]],
        context: list[str],
        deadline: float,
        quorum: int,
        budget: TokenBudget,
        infra: set[str],
    ) -> list[ExpertAnswer]:
        """Run every chosen expert in parallel until all are done or ``quorum`` (> 0) have
        answered; those still without an outcome are then cancelled and recorded so (an
        expert records its outcome before emitting it, so no answer is lost to the cut).
        Cancelling the job cancels them all."""
        ctx = current_job()
        assert ctx is not None
        results: dict[str, ExpertAnswer] = {}
        enough = asyncio.Event()

        def answered() -> None:
            if quorum and sum(a.status == "answered" for a in results.values()) >= quorum:
                enough.set()

        tasks = {
            name: asyncio.create_task(
                self._expert(job, self.index.experts[name], relevance, context, deadline, results, budget, answered, infra)
            )
            for name, relevance in chosen
        }
        await until_quorum(tasks, results, enough if quorum else None)
        for name, _ in chosen:
            if name not in results:
                reason = f"{quorum} experts had answered"
                results[name] = ExpertAnswer(expert=name, status="cancelled", error=reason, tokens=budget.charged.get(name, 0))
                await ctx.emit(ExpertCancelled(expert=name, reason=reason))
        return [results[n] for n, _ in chosen]

    async def _expert(
        self,
        job: Ask,
        e: Expert,
        relevance: float,
        context: list[str],
        deadline: float,
        out: dict[str, ExpertAnswer],
        token_budget: TokenBudget,
        answered: Callable[[], None],
        infra: set[str],
    ) -> None:
        ctx = current_job()
        assert ctx is not None and self.cache is not None
        loop = asyncio.get_running_loop()
        budget = min(
            e.timeout_s or job.expert_timeout_s or self.config.expert_timeout_s,
            deadline - loop.time() - self.config.synthesis_reserve_s,
        )
        if budget <= 0:
            out[e.name] = ExpertAnswer(expert=e.name, status="timed_out", error="no time left in the job's deadline")
            await ctx.emit(ExpertTimedOut(expert=e.name, budget_s=0.0))
            return
        t0 = time.perf_counter()
        prompt = e.prompt.format(role=e.role, task=job.text)
        key = AnswerCache.key(self.config.llm_provider, self.config.llm_model, e.role, prompt, context)
        hit = await self.cache.get(key) if job.use_cache else None
        tokens = 0
        if hit is not None:
            await ctx.emit(ExpertStarted(expert=e.name, budget_s=round(budget, 3)))
            answer, confidence, cached = hit[0], hit[1], True
        else:
            c = self.config
            prompt_est = estimate_tokens(e.role, prompt, *context)
            grant = token_budget.reserve(prompt_est, c.expert_max_tokens, c.min_completion_tokens)
            if grant is None:
                need = prompt_est + c.min_completion_tokens
                why = f"token budget: {token_budget.left} of {token_budget.total} left, the call needs {need}"
                out[e.name] = ExpertAnswer(expert=e.name, status="skipped", error=why)
                await ctx.emit(ExpertSkipped(expert=e.name, reason=why, tokens_left=token_budget.left))
                return
            reserved = prompt_est + grant
            # A call cancelled (quorum, job cancel) or timed out is charged its prompt: the model had it.
            token_budget.charged[e.name] = prompt_est
            try:
                await ctx.emit(ExpertStarted(expert=e.name, budget_s=round(budget, 3), tokens_reserved=reserved))
                # stream=True: reasoning adds its partial output to this job's events
                # (reasoning.answer_streamed, labelled with the expert), from any pod.
                reason = Reason(
                    role=e.role,
                    task=prompt,
                    context=context,
                    latency_s=e.latency_s if e.latency_s is not None else job.latency_s,
                    stream=True,
                    label=e.name,
                    options={"max_tokens": grant},
                )
                try:
                    r = await self.kernel.call(reason, timeout_s=budget)
                except DeadlineExceeded:
                    out[e.name] = ExpertAnswer(
                        expert=e.name, status="timed_out", error=f"no answer within {budget:.2f} s", tokens=prompt_est
                    )
                    await ctx.emit(ExpertTimedOut(expert=e.name, budget_s=round(budget, 3)))
                    return
                except AiwfeError as err:
                    if _infrastructure(err):
                        infra.add(e.name)
                    out[e.name] = ExpertAnswer(expert=e.name, status="failed", error=str(err), tokens=prompt_est)
                    await ctx.emit(ExpertFailed(expert=e.name, reason=str(err)))
                    return
                # What the provider reported, else the estimate; never more than was reserved.
                tokens = min(reserved, (r.prompt_tokens or prompt_est) + r.completion_tokens)
                token_budget.charged[e.name] = tokens
            finally:
                token_budget.settle(reserved, token_budget.charged[e.name])
            answer, confidence, cached = r.answer, r.confidence, False
        latency_ms = round((time.perf_counter() - t0) * 1000, 3)
        out[e.name] = ExpertAnswer(
            expert=e.name,
            status="answered",
            answer=answer,
            confidence=confidence,
            weight=round(relevance * e.weight, 6),
            latency_ms=latency_ms,
            cached=cached,
            tokens=tokens,
        )
        answered()
        await ctx.emit(
            ExpertAnswered(
                expert=e.name, answer=answer, confidence=confidence, cached=cached, latency_ms=latency_ms, tokens=tokens
            )
        )
        if not cached:
            await self.cache.put(key, answer, confidence)

    async def _synthesise(self, answers: list[ExpertAnswer], t0: float, quorum: int, budget: TokenBudget) -> Synthesis:
        ctx = current_job()
        assert ctx is not None
        text, confidence = synthesise(answers, self.config.max_synthesis_sentences)
        if text:  # the deltas in order, sent together and confirmed together (one round trip)
            await ctx.emit_many([SynthesisDelta(text=sentence) for sentence in SENTENCE_BREAK.split(text)])
        return Synthesis(
            answer=text,
            confidence=confidence,
            experts=answers,
            elapsed_ms=round((time.perf_counter() - t0) * 1000, 3),
            min_answers=quorum,
            token_budget=budget.total,
            tokens_spent=sum(a.tokens for a in answers),
        )
