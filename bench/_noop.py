"""The no-op job plugin ``aiwfe bench jobs`` runs, and the submitter that declares the job."""

from __future__ import annotations

from aiwfe.kernel import Job, Plugin, Reply, serves


class Nooped(Reply):
    n: int


class Noop(Job[Nooped], tag="bench.noop"):
    n: int = 0


class NoopWorkerPlugin(Plugin):
    name = "noop_worker"

    @serves(Noop, concurrency=256, max_queue=8192, ack_wait_s=30.0)
    async def run(self, job: Noop) -> Nooped:
        return Nooped(n=job.n)


class NoopSubmitterPlugin(Plugin):
    name = "noop_submitter"
    calls = (Noop,)
