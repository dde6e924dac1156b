"""Password hashing off the event loop: a bounded gate in front of the hashing threads, which run
at a lowered CPU priority (``kdf_priority``), so a login burst never slows token checks."""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

from aiwfe.kernel.errors import Overloaded

__all__ = ["KdfGate"]

log = logging.getLogger("aiwfe.auth")


def _lower_thread_priority(priority: str) -> None:
    """Lower the calling (hashing) thread's CPU priority; argon2's lane threads inherit it.

    ``idle``: ``SCHED_IDLE``, the thread runs only on CPU time nothing else wants;
    ``low``: niceness + 10; ``normal``: unchanged. Linux only (there both calls act on the
    calling thread alone; elsewhere they would change the whole process).
    """
    if priority == "normal" or sys.platform != "linux":
        return
    try:
        if priority == "idle":
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        else:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + 10)
    except OSError as e:
        log.warning("auth: could not lower the hashing threads' priority: %s", e)


class KdfGate:
    """Admission to the bounded password-hashing pool: admit a caller only when its hash
    is expected to start within ``max_wait_s``, else answer Overloaded at once, with the
    seconds until one would be admitted as its ``retry_after_s`` (at least 1).

    The expected wait is ``ceil((pending + 1) / workers) * average hash time``; the
    average is a moving one of measured hash times (queue wait excluded). A slot is
    held from admission to the end of the hash (a login's user lookup included), so
    the estimate counts everyone already admitted.

    **Staggered retries.** Callers refused together must not all come back together (a
    burst of 200 logins, each told "1 s", came back ~9 times each: 1,744 refused requests
    whose handling took the CPU the burst's handshakes needed). The gate remembers when it
    told refused callers to come back (at most :attr:`MAX_PROMISED`, for at most
    :attr:`PROMISE_S`); a caller refused now is told to come back after those, one hash
    time per ``workers`` of them (rounded up to whole seconds, as ``Retry-After``), so each retry
    is likely to be admitted.
    """

    __slots__ = ("avg_s", "max_wait_s", "pending", "promised", "workers")

    #: Remembered retry times (beyond them, a caller gets the latest one).
    MAX_PROMISED = 10_000
    #: A retry hint is never longer than this (seconds); clients may retry sooner anyway.
    PROMISE_S = 60.0

    def __init__(self, workers: int, max_wait_s: float, avg_s: float = 0.1) -> None:
        self.workers = workers
        self.max_wait_s = max_wait_s
        self.avg_s = avg_s
        self.pending = 0
        self.promised: list[float] = []  # sorted monotonic times refused callers were told to retry at

    def expected_wait_s(self) -> float:
        """Seconds until a hash admitted now would finish."""
        return -(-(self.pending + 1) // self.workers) * self.avg_s

    def check(self) -> None:
        """Refuse now if a hash asked for now would not be admitted (:meth:`slot` decides again
        when it is taken).

        Raises:
            Overloaded: the hash would not finish within ``max_wait_s``.
        """
        wait_s = self.expected_wait_s()
        if self.pending and wait_s > self.max_wait_s:
            raise Overloaded(
                f"auth: password hashing saturated (~{wait_s:.1f} s of work queued); retry later",
                retry_after_s=self._promise(wait_s),
            )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one admitted hash.

        Raises:
            Overloaded: the hash would not finish within ``max_wait_s``.
        """
        self.check()
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def _promise(self, wait_s: float) -> float:
        """The retry hint for a caller refused now, in whole seconds: when the work queued now
        would let a new hash start within ``max_wait_s``, after the callers already told to come
        back earlier (one hash time per ``workers`` of them); at least 1 s, at most :attr:`PROMISE_S`."""
        now = time.monotonic()
        promised = self.promised
        del promised[: bisect.bisect_right(promised, now)]  # those times have come
        ahead = len(promised)
        after_s = max(1.0, wait_s - self.max_wait_s + (ahead // self.workers) * self.avg_s)
        # Whole seconds: HTTP's Retry-After is, and a hint the client rounds up would otherwise
        # be booked here for a moment before the caller actually returns.
        after_s = float(min(math.ceil(after_s), self.PROMISE_S))
        if ahead < self.MAX_PROMISED:
            bisect.insort(promised, now + after_s)
        return after_s

    def observe(self, seconds: float) -> None:
        """Record the duration of one hash."""
        self.avg_s += 0.2 * (seconds - self.avg_s)
