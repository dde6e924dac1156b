"""Two plugins: ``echo`` serves :class:`Echo` (counting in Redis), ``shout`` consumes the
:class:`Shout` job and calls ``echo`` — in-process when they share a pod, over NATS otherwise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import msgspec
import redis.asyncio as redis

from aiwfe.kernel import Plugin, current_job, serves

from .contract import Echo, Echoed, Shout, Shouted, Shouting

__all__ = ["EchoPlugin", "ShoutPlugin"]


class EchoPlugin(Plugin):
    name = "echo"
    services = ("redis",)

    class Config(msgspec.Struct, frozen=True):
        """``redis_url``: empty takes ``REDIS_URL``. ``key_prefix``: of the Redis counters."""

        redis_url: str = ""
        key_prefix: str = "echo"

    config: Config

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        self.redis = redis.Redis.from_url(self.config.redis_url or os.environ["REDIS_URL"])
        try:
            yield
        finally:
            await self.redis.aclose()

    @serves(Echo, concurrency=64, max_queue=1024)
    async def say(self, req: Echo) -> Echoed:
        count = await self.redis.incr(f"{self.config.key_prefix}:{req.text}")
        return Echoed(text=req.text, count=int(count))


class ShoutPlugin(Plugin):
    name = "shout"
    calls = (Echo, Shouting)

    @serves(Shout, concurrency=8)
    async def shout(self, job: Shout) -> Shouted:
        ctx = current_job()
        parts = []
        for n in range(job.times):
            parts.append((await self.kernel.call(Echo(text=job.text))).text.upper())
            if ctx is not None:
                await ctx.emit(Shouting(n=n))
        return Shouted(text=" ".join(parts))
