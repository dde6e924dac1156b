"""A coarse timer wheel for deadlines (the kernel's calls and NatsBus's requests share one per loop)."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["DeadlineWheel"]


class _Timer:
    __slots__ = ("expired", "sink", "target")

    def __init__(self, target: asyncio.Future[Any], sink: dict[Any, float] | None) -> None:
        self.target = target
        self.sink = sink
        self.expired = False


class DeadlineWheel:
    """Cancels tasks (or futures) whose deadline passed, for all calls of one event loop.

    A per-call ``asyncio.timeout`` costs ~4 µs (a TimerHandle, a context copy, heap
    churn); this wheel files each call in a bucket of ``tick_s`` and sweeps the due
    buckets while calls are in flight, for ~0.5 µs a call. A deadline therefore fires
    up to ``tick_s`` late, never early.
    """

    def __init__(self, tick_s: float = 0.005) -> None:
        self.tick_s = tick_s
        self._buckets: dict[int, set[_Timer]] = {}
        self._count = 0
        self._cursor = 0
        self._handle: asyncio.TimerHandle | None = None

    def add(self, deadline: float, target: asyncio.Future[Any], sink: dict[Any, float] | None = None) -> tuple[int, _Timer]:
        """Watch ``target`` until :meth:`remove`; cancel it once ``deadline`` (loop time) passes.

        The returned key's ``[1].expired`` tells a CancelledError from the wheel apart
        from any other cancellation. When the deadline fires, the timer is entered in
        ``sink`` (if given) with the loop time it fired at; the watcher takes it out
        again when its work ends, so ``sink`` holds the work still running past its deadline.

        Raises:
            OverflowError, ValueError: ``deadline`` is not finite (validate it first).
        """
        if self._handle is None:
            loop = target.get_loop()
            self._cursor = int(loop.time() / self.tick_s)
            self._handle = loop.call_at((self._cursor + 1) * self.tick_s, self._sweep, loop)
        # A deadline already behind the sweep position goes in the next bucket swept.
        b = max(int(deadline / self.tick_s) + 1, self._cursor)
        t = _Timer(target, sink)
        s = self._buckets.get(b)
        if s is None:
            s = self._buckets[b] = set()
        s.add(t)
        self._count += 1
        return b, t

    def remove(self, key: tuple[int, _Timer]) -> None:
        """Stop watching (the call finished)."""
        b, t = key
        s = self._buckets.get(b)
        if s is not None and t in s:
            s.discard(t)
            self._count -= 1
            if not s:
                del self._buckets[b]

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        now_b = int(now / self.tick_s)
        buckets = self._buckets
        for b in range(self._cursor, now_b + 1):
            s = buckets.pop(b, None)
            if s:
                self._count -= len(s)
                for t in s:
                    t.expired = True
                    if t.sink is not None:
                        t.sink[t] = now
                    t.target.cancel()
        self._cursor = now_b + 1
        if self._count > 0:
            self._handle = loop.call_at((now_b + 1) * self.tick_s, self._sweep, loop)
        else:
            self._handle = None
