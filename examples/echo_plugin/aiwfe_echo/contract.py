"""The echo plugins' messages: importing this loads msgspec and aiwfe.kernel.contract only."""

from __future__ import annotations

from aiwfe.kernel.contract import Event, Job, Reply, Request

__all__ = ["Echo", "Echoed", "Shout", "Shouted", "Shouting"]


class Echoed(Reply):
    text: str
    count: int  # how many times this text has been echoed (kept in Redis)


class Echo(Request[Echoed], tag="echo.say"):
    """Echo ``text`` back."""

    text: str


class Shouted(Reply):
    text: str


class Shout(Job[Shouted], tag="echo.shout"):
    """A durable job: echo ``text`` (through the echo plugin), upper-cased, ``times`` times."""

    text: str
    times: int = 1


class Shouting(Event, tag="echo.shouting"):
    """Progress of a shout: one per echo."""

    n: int
