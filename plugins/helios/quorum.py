"""Waiting for experts: all of them, or until a quorum has answered (then the rest stop)."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

__all__ = ["until_quorum"]


async def until_quorum(tasks: dict[str, asyncio.Task[Any]], decided: Collection[str], enough: asyncio.Event | None) -> None:
    """Wait until every task is done or ``enough`` is set; then cancel the tasks whose name
    is not in ``decided`` (a live view of the experts that have an outcome: those finish
    emitting it) and wait for all of them. ``enough`` None: no quorum, every task is waited
    for (one wait, not one per finished task).

    No task outlives this call: on an error (an expert raised something unexpected, which is
    re-raised) or a cancel of the caller, every task is cancelled and waited for, even if the
    caller is cancelled again meanwhile (as :class:`asyncio.TaskGroup` does).
    """
    quorum_reached = asyncio.create_task(enough.wait()) if enough is not None else None
    try:
        pending: set[asyncio.Task[Any]] = set(tasks.values())
        if quorum_reached is None:
            if pending:  # returns once all are done or one raised, as the loop below would
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    t.result()
            return
        assert enough is not None
        while pending and not enough.is_set():
            done, pending = await asyncio.wait(pending | {quorum_reached}, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(quorum_reached)
            for t in done - {quorum_reached}:
                t.result()
        if pending:
            for name, t in tasks.items():
                if name not in decided:
                    t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
    finally:
        waited = [*tasks.values()]
        if quorum_reached is not None:
            quorum_reached.cancel()
            waited.append(quorum_reached)
        for t in tasks.values():
            t.cancel()
        recancelled = False
        while running := [t for t in waited if not t.done()]:
            try:
                await asyncio.wait(running)
            except asyncio.CancelledError:
                recancelled = True
        if recancelled:
            raise asyncio.CancelledError
