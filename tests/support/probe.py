"""Test-only plugins: a front plugin that calls the real ones, jobs, and misbehaving handlers.

Named in test manifests by import path (``tests.support.probe:ProbePlugin``), the way a
plugin that is not installed is named.
"""

from __future__ import annotations

import asyncio
import os

import msgspec

from aiwfe.kernel import Event, Job, Plugin, Reply, Request, current_job, serves
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.reasoning.contract import Reason


class Answer(Reply):
    intent: str
    tags: list[str]
    answer: str
    confidence: float


class Ask(Request[Answer], tag="probe.ask"):
    text: str
    context: list[str] = []


class Crunched(Reply):
    n: int
    square: int
    answer: str


class Crunch(Job[Crunched], tag="probe.crunch"):
    n: int
    delay_s: float = 0.0
    fail_times: int = 0  # fail the first N attempts (always fail when >= max_deliver)


class Progressed(Event, tag="probe.progressed"):
    n: int
    step: str


class Slept(Reply):
    slept_s: float


class Sleep(Request[Slept], tag="probe.sleep"):
    seconds: float


class Boom(Request[Slept], tag="probe.boom"):
    message: str = "boom"
    retryable: bool = False


class Flaky(Exception):
    retryable = True


class ProbePlugin(Plugin):
    """Front plugin used by the placement suite (calls perception and reasoning)."""

    name = "probe"
    calls = (Perceive, Reason)
    reject_negative = True  # a poison switch: tests clear it to "fix" the handler

    class Config(msgspec.Struct, frozen=True):
        sleep_concurrency: int = 2

    @serves(Ask)
    async def ask(self, req: Ask) -> Answer:
        p = await self.kernel.call(Perceive(text=req.text))
        r = await self.kernel.call(Reason(role="generalist", task=req.text, context=req.context))
        return Answer(intent=p.intent, tags=[e.tag for e in p.expertise], answer=r.answer, confidence=r.confidence)

    @serves(Crunch, concurrency=32, ack_wait_s=3.0, max_deliver=3, backoff_s=(0.1,))
    async def crunch(self, job: Crunch) -> Crunched:
        ctx = current_job()
        assert ctx is not None
        if ctx.attempt <= job.fail_times:
            raise Flaky(f"attempt {ctx.attempt} of job n={job.n} fails on purpose")
        if job.n < 0 and self.reject_negative:
            raise ValueError(f"n={job.n}: negative numbers are poison (until reject_negative is cleared)")
        await ctx.emit(Progressed(n=job.n, step="started"))
        if job.delay_s:
            await asyncio.sleep(job.delay_s)
        r = await self.kernel.call(
            Reason(role="math", task=f"square of {job.n}", context=[f"The square of {job.n} is {job.n * job.n}."])
        )
        return Crunched(n=job.n, square=job.n * job.n, answer=r.answer)

    @serves(Sleep, concurrency=2, max_queue=2)
    async def sleep(self, req: Sleep) -> Slept:
        await asyncio.sleep(req.seconds)
        return Slept(slept_s=req.seconds)

    @serves(Boom)
    async def boom(self, req: Boom) -> Slept:
        if req.retryable:
            raise Flaky(req.message)
        raise ValueError(req.message)


class Pid(Reply):
    pid: int


class WhoAmI(Request[Pid], tag="probe.whoami"):
    pass


class WhoPlugin(Plugin):
    """Answers with its process id (proves which process served a call)."""

    name = "who"

    @serves(WhoAmI)
    async def whoami(self, req: WhoAmI) -> Pid:
        return Pid(pid=os.getpid())


class Tally(Job[Crunched], tag="probe.tally"):
    """A job for fault tests: generous redelivery budget, short ack wait."""

    n: int
    delay_s: float = 0.02


class TallyPlugin(Plugin):
    """Consumes probe.tally; calls reasoning on every job (a remote call when split)."""

    name = "tally"
    calls = (Reason,)

    @serves(Tally, concurrency=64, ack_wait_s=2.0, max_deliver=20, backoff_s=(0.2, 0.5, 1.0))
    async def tally(self, job: Tally) -> Crunched:
        await asyncio.sleep(job.delay_s)
        r = await self.kernel.call(
            Reason(role="math", task=f"square of {job.n}", context=[f"The square of {job.n} is {job.n * job.n}."]), timeout_s=2
        )
        return Crunched(n=job.n, square=job.n * job.n, answer=r.answer)
