"""Group commit: concurrent callers share one statement.

:class:`GroupCommit` runs ``flush(items)`` for items submitted concurrently, one flush
at a time; whatever arrives during a flush goes into the next one. Alone, a caller's item
is flushed at once (no added latency); under load, one round trip serves many callers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


class GroupCommit(Generic[T, R]):
    """Batch ``submit``-ted items into calls of ``flush`` (at most ``max_batch`` items each).

    ``flush`` returns one result per item, in order; if it raises, every caller of that
    batch gets the exception. A caller that is cancelled leaves its item in the batch.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], max_batch: int = 256) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result.

        Raises:
            whatever ``flush`` raised for the batch holding ``item``.
        """
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            try:
                results = await self._flush([item for item, _ in batch])
            except BaseException as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def aclose(self) -> None:
        """Wait for the flush in progress (and what is queued behind it)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
