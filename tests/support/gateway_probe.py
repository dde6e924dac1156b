"""Test-only plugins for the gateway: a job that emits many events, and a tight auth double."""

from __future__ import annotations

import asyncio

import msgspec

from aiwfe.kernel import Event, Job, Plugin, Reply, current_job, serves
from aiwfe.plugins.auth.contract import Claims, Verify
from tests.support.auth_double import AuthDoublePlugin

__all__ = ["Spew", "SpewPlugin", "Spewed", "Spurt", "TightAuthPlugin"]


class Spewed(Reply):  # type: ignore[misc]
    count: int


class Spew(Job[Spewed], tag="gwprobe.spew"):  # type: ignore[misc]
    """Emit ``count`` events of ``size`` bytes each, ``every_s`` apart."""

    count: int = 10
    size: int = 100
    every_s: float = 0.0


class Spurt(Event, tag="gwprobe.spurt"):  # type: ignore[misc]
    i: int
    blob: str


class SpewPlugin(Plugin):
    name = "gwprobe"

    @serves(Spew, concurrency=16, ack_wait_s=10.0, max_deliver=1)
    async def spew(self, job: Spew) -> Spewed:
        ctx = current_job()
        assert ctx is not None
        blob = "x" * job.size
        for i in range(job.count):
            await ctx.emit(Spurt(i=i, blob=blob))
            if job.every_s:
                await asyncio.sleep(job.every_s)
        return Spewed(count=job.count)


class TightAuthPlugin(AuthDoublePlugin):
    """The auth double with one verify at a time and no queue (so a second caller is Overloaded)."""

    class Config(msgspec.Struct, frozen=True):
        token_ttl_s: int = 900
        verify_delay_s: float = 0.5

    @serves(Verify, concurrency=1, max_queue=0)
    async def verify(self, req: Verify) -> Claims:
        await asyncio.sleep(self.config.verify_delay_s)  # type: ignore[attr-defined]
        return self._decode(req.token)
