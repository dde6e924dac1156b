"""A concurrency limit with a bounded queue, fair between owners (:class:`Limiter`).

Every handler's limit (:class:`~aiwfe.kernel.serving.Endpoint`) is one, keyed by whom a call
acts for; plugins use it for their own scarce slots (reasoning's provider calls, with a
reserve). It lives apart from the serving path because plugins use it too.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from .errors import Overloaded

__all__ = ["Limiter"]


class Limiter:
    """A concurrency limit with a bounded queue that answers Overloaded when full, fair
    between the keys its callers give.

    ``enter(key)`` takes a slot, waits in the queue, or raises :class:`Overloaded`;
    ``leave(key)`` gives it back. The key is whom the call acts for
    (:func:`~aiwfe.kernel.serving.current_owner`; None for nobody). Waiters queue per key; a
    released slot goes to the keys with waiters in turn (round robin), to the oldest waiter
    of that key: one owner's many queued calls delay another owner's call by at most one
    call of each other waiting key, not by all of them. When the queue is full, an arrival
    whose key has at least two fewer waiters than the key with the most takes the place of
    that key's newest waiter (which gets Overloaded): a flood cannot fill the queue against
    everyone else (with a queue of one, the first waiter keeps it). Otherwise the arrival
    gets Overloaded at once. A cancelled waiter leaves the queue or passes on a slot handed
    to it meanwhile.

    ``reserve`` (default 0): the last ``reserve`` free slots are kept for keys holding fewer
    than ``reserve`` slots. A key holding ``reserve`` or more waits while no more than
    ``reserve`` are free, so owners who already run many long calls (together, too) cannot
    take the slots a light owner's call needs. Running slots are never taken back; the cost
    is that one heavy owner alone can use ``limit - reserve`` slots.
    """

    __slots__ = ("_queues", "_running", "_turn", "active", "limit", "max_queue", "name", "reserve", "waiting")

    def __init__(self, name: str, limit: int, max_queue: int, reserve: int = 0) -> None:
        if limit < 1:
            raise ValueError(f"{name}: a limit (concurrency) of {limit}: at least 1 must be able to run")
        if not 0 <= reserve < limit:
            raise ValueError(f"{name}: reserve {reserve} must be at least 0 and below the limit {limit}")
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self.reserve = reserve
        self.active = 0
        #: Callers queued for a slot (all keys).
        self.waiting = 0
        self._queues: dict[Any, collections.deque[asyncio.Future[None]]] = {}
        self._turn: collections.deque[Any] = collections.deque()  # keys with waiters, next first
        self._running: dict[Any, int] = {}  # slots held per key (kept only with a reserve)

    def _may_take(self, key: Any) -> bool:
        """Whether ``key`` may take a free slot now (always, without a reserve)."""
        return not self.reserve or self.limit - self.active > self.reserve or self._running.get(key, 0) < self.reserve

    def _take(self, key: Any) -> None:
        self.active += 1
        if self.reserve:
            self._running[key] = self._running.get(key, 0) + 1

    async def enter(self, key: Any = None) -> None:
        """Take a slot for ``key``. Raises Overloaded when the queue is full (see the class)."""
        # Without a reserve a free slot means nobody waits; with one, whoever waits may not
        # take the free slots, and an arrival that may runs at once.
        if self.active < self.limit and (not self.reserve or self._may_take(key)):
            self._take(key)
            return
        if self.waiting >= self.max_queue:
            self._make_room(key)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = collections.deque()
            self._turn.append(key)
        q.append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.leave(key)  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._drop(key, fut)  # leave() may have dropped it already (cancelled futures are skipped)
            raise

    def leave(self, key: Any = None) -> None:
        """Release ``key``'s slot: to the oldest waiter of the next key in turn that may take
        it. With a reserve, the release may let more than one waiting key take a free slot
        (the leaving key may have dropped below the reserve): each that may, does."""
        self.active -= 1
        turn = self._turn
        if not self.reserve:
            if not turn:
                return
        elif (held := self._running.get(key, 0) - 1) > 0:
            self._running[key] = held
        else:
            self._running.pop(key, None)
        queues = self._queues
        skipped = 0
        while skipped < len(turn) and self.active < self.limit:
            k = turn[0]
            if not self._may_take(k):
                turn.rotate(-1)
                skipped += 1
                continue
            turn.popleft()
            q = queues[k]
            fut = q.popleft()
            self.waiting -= 1
            if q:
                turn.append(k)
            else:
                del queues[k]
            skipped = 0
            if not fut.done():
                self._take(k)
                fut.set_result(None)
                if not self.reserve:
                    return  # one slot was freed, one taken

    def _drop(self, key: Any, fut: asyncio.Future[None]) -> None:
        q = self._queues.get(key)
        if q is not None and fut in q:
            q.remove(fut)
            self.waiting -= 1
            if not q:
                del self._queues[key]
                self._turn.remove(key)

    def _make_room(self, key: Any) -> None:
        """The queue is full: refuse the newest waiter of the longest queue when ``key`` has
        fewer waiters than it by more than one, else raise Overloaded."""
        if not self._queues:  # max_queue 0: no queue at all
            raise Overloaded(f"{self.name}: {self.active} running, no queue; retry later")
        own = len(self._queues.get(key, ()))
        longest = max(self._queues, key=lambda k: len(self._queues[k]))
        q = self._queues[longest]
        if longest == key or len(q) <= own + 1:
            raise Overloaded(f"{self.name}: {self.active} running and {self.waiting} queued; retry later")
        fut = q.pop()  # stays non-empty: it was longer than own + 1 >= 1
        self.waiting -= 1
        if not fut.done():
            fut.set_exception(
                Overloaded(f"{self.name}: {self.active} running and {self.waiting} queued, a caller with fewer came; retry later")
            )
