"""What the fault tests watch: every job's events as they land, read as the operator does.

:class:`Outcomes` follows ``<prefix>.events.>`` with one ordered consumer (the ``admin`` user's
JetStream access, as ``aiwfe publish`` has it) and keeps, per job, each event type with the
monotonic time it arrived. The fault tests read it for "how many finished, failed, were recorded
twice" and "when did the first one finish after the fault" without polling 200 records.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Iterable

import nats
from nats.aio.msg import Msg

from aiwfe.bus.codec import H_TYPE
from aiwfe.kernel.jobs import EV_CANCELLED, EV_DONE, EV_FAILED, EV_RETRYING
from aiwfe.kernel.tools.natsauth import inbox_prefix

__all__ = ["TERMINAL", "Outcomes", "follow_outcomes"]

TERMINAL = frozenset({EV_DONE, EV_FAILED, EV_CANCELLED})


class Outcomes:
    """Per job id: ``(type, monotonic time)`` of every event seen so far."""

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
        self.changed = asyncio.Event()

    def on_msg(self, msg: Msg) -> None:
        typ = (msg.headers or {}).get(H_TYPE, "")
        self.events[msg.subject.rsplit(".", 1)[1]].append((typ, time.monotonic()))
        if typ in TERMINAL:
            self.changed.set()

    def terminal(self, job_id: str) -> list[str]:
        """The terminal event types of ``job_id`` (exactly one when its outcome was told once)."""
        return [t for t, _ in self.events.get(job_id, ()) if t in TERMINAL]

    def count(self, job_id: str, typ: str) -> int:
        """How many ``typ`` events ``job_id`` has."""
        return sum(1 for t, _ in self.events.get(job_id, ()) if t == typ)

    def retried(self, ids: Iterable[str]) -> int:
        """How many of ``ids`` announced a retry (``job.retrying``)."""
        return sum(1 for j in ids if self.count(j, EV_RETRYING))

    def first_done_after(self, ids: Iterable[str], t: float) -> float | None:
        """The earliest ``job.done`` of ``ids`` at or after monotonic time ``t`` (None: none yet)."""
        times = [at for j in ids for typ, at in self.events.get(j, ()) if typ == EV_DONE and at >= t]
        return min(times) if times else None

    def last_terminal(self, ids: Iterable[str]) -> float | None:
        """When the last of ``ids`` got its terminal event (None while one has none)."""
        out = 0.0
        for j in ids:
            times = [at for typ, at in self.events.get(j, ()) if typ in TERMINAL]
            if not times:
                return None
            out = max(out, min(times))
        return out

    async def wait_all(self, ids: list[str], timeout_s: float) -> list[str]:
        """Wait until every one of ``ids`` has a terminal event or ``timeout_s`` passed; return
        the ids still without one (an empty list: all finished)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            pending = [j for j in ids if not self.terminal(j)]
            if not pending or loop.time() >= end:
                return pending
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(1.0, end - loop.time()))


@contextlib.asynccontextmanager
async def follow_outcomes(url: str, prefix: str, user: str = "admin") -> AsyncIterator[Outcomes]:
    """Follow every job event of ``prefix`` (replayed from the first), connected to ``url`` as ``user`` (whose
    credentials ``url`` carries; its inbox is ``_INBOX.<user>``, the only one it may read)."""
    out = Outcomes()
    nc = await nats.connect(
        url, inbox_prefix=inbox_prefix(user).encode(), max_reconnect_attempts=-1, reconnect_time_wait=0.5, ping_interval=2
    )
    try:
        js = nc.jetstream()

        async def cb(msg: Msg) -> None:
            out.on_msg(msg)

        sub = await js.subscribe(f"{prefix}.events.>", cb=cb, ordered_consumer=True, deliver_policy=nats.js.api.DeliverPolicy.ALL)
        try:
            yield out
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
