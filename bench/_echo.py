"""The echo plugin the RPC benchmark calls."""

from __future__ import annotations

from aiwfe.kernel import Plugin, Reply, Request, serves


class Echoed(Reply):
    text: str


class Echo(Request[Echoed], tag="bench.echo"):
    text: str


class EchoPlugin(Plugin):
    name = "echo"

    @serves(Echo, concurrency=512, max_queue=8192)
    async def echo(self, req: Echo) -> Echoed:
        return Echoed(text=req.text)


class CallerPlugin(Plugin):
    name = "caller"
    calls = (Echo,)
