"""Login throttling: failed attempts per username and per client address, exponential backoff.

Each failed login counts against two keys: the (lower-cased) username, whether or not such a
user exists, and the client address the gateway saw. Once a key has ``free`` failures within
``window_s``, every further failure locks it for ``base_s × 2^(failures − free)`` seconds (at
most ``max_s``); a login against a locked key is refused before any database or hashing work
with :class:`~.errors.TooManyAttempts` (HTTP 429, ``Retry-After``). The refusal is the same for
a user that exists and one that does not, so throttling reveals nothing about who has an account.
A successful login clears its username's count (never the address's).

State lives in Redis (``<prefix>:throttle:{user,addr}:<sha256>``, shared by every auth pod,
expiring by itself) **and** in this pod's memory, and a check takes the stricter of the two:
with Redis down (breaker open) the pod still throttles on its own count.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import Any

from .errors import TooManyAttempts

__all__ = ["LoginThrottle", "MemoryCounts"]


class MemoryCounts:
    """Failure counts with their lock expiry, in memory, bounded to ``max_keys`` (oldest out)."""

    __slots__ = ("_d", "max_keys", "window_s")

    def __init__(self, window_s: float, max_keys: int = 100_000) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._d: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # key → (fails, last, locked_until)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds ``key`` stays locked (0 when it is not)."""
        e = self._d.get(key)
        return max(0.0, e[2] - now) if e is not None else 0.0

    def fail(self, key: str, now: float) -> int:
        """Count one failure of ``key``; return its count within the window."""
        fails, last, until = self._d.pop(key, (0, now, 0.0))
        if now - last > self.window_s:
            fails = 0
        self._d[key] = (fails + 1, now, until)
        while len(self._d) > self.max_keys:
            self._d.popitem(last=False)
        return fails + 1

    def lock(self, key: str, until: float) -> None:
        e = self._d.get(key)
        if e is not None and until > e[2]:
            self._d[key] = (e[0], e[1], until)

    def clear(self, key: str) -> None:
        self._d.pop(key, None)


class LoginThrottle:
    """The login attempt limits (see the module doc).

    Args:
        cache: the plugin's :class:`~.cache.ClaimCache` (its Redis client and breaker), or None.
        prefix: Redis key prefix.
        user_free, addr_free: failures allowed per username / per address before backoff.
        base_s, max_s: first lock and longest lock.
        window_s: failures older than this (since the last one) are forgotten.
    """

    def __init__(
        self,
        cache: Any,
        *,
        prefix: str,
        user_free: int = 5,
        addr_free: int = 20,
        base_s: float = 1.0,
        max_s: float = 900.0,
        window_s: float = 900.0,
    ) -> None:
        self.cache = cache
        self.prefix = prefix
        self.free = {"user": user_free, "addr": addr_free}
        self.base_s = base_s
        self.max_s = max_s
        self.window_s = window_s
        self.memory = MemoryCounts(window_s)

    def _keys(self, username: str, addr: str) -> list[tuple[str, str]]:
        out = [("user", username.lower())]
        if addr:
            out.append(("addr", addr))
        return [(kind, f"{self.prefix}:throttle:{kind}:{hashlib.sha256(v.encode()).hexdigest()}") for kind, v in out]

    def delay_s(self, kind: str, fails: int) -> float:
        """The lock after the ``fails``-th failure of a key of ``kind`` (0 while free)."""
        over = fails - self.free[kind]
        if over < 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(over, 32))

    async def check(self, username: str, addr: str) -> None:
        """Refuse a login whose username or address is locked.

        Raises:
            TooManyAttempts: with ``retry_after_s``, the seconds until the lock ends (at least 1).
        """
        now = time.time()
        keys = self._keys(username, addr)
        wait = max(self.memory.locked_for(k, now) for _, k in keys)
        cache = self.cache
        if cache is not None and cache.available:

            async def op() -> Any:
                pipe = cache.client.pipeline(transaction=False)
                for _, k in keys:
                    pipe.pttl(k + ":lock")
                return await pipe.execute()

            ok, ttls = await cache.execute(op)
            if ok:
                wait = max([wait, *(t / 1000 for t in ttls if t and t > 0)])
        if wait > 0:
            raise TooManyAttempts("too many failed logins; retry later", retry_after_s=float(max(1, math.ceil(wait))))

    async def failed(self, username: str, addr: str) -> None:
        """Count a failed login against its username and address; lock them past their allowance."""
        now = time.time()
        keys = self._keys(username, addr)
        counts = {k: self.memory.fail(k, now) for _, k in keys}
        cache = self.cache
        if cache is not None and cache.available:
            window = max(1, math.ceil(self.window_s))

            async def op() -> Any:
                pipe = cache.client.pipeline(transaction=False)
                for _, k in keys:
                    pipe.incr(k)
                    pipe.expire(k, window)
                return await pipe.execute()

            ok, res = await cache.execute(op)
            if ok:
                for i, (_, k) in enumerate(keys):
                    counts[k] = max(counts[k], int(res[2 * i]))
        locks = []
        for kind, k in keys:
            d = self.delay_s(kind, counts[k])
            if d > 0:
                self.memory.lock(k, now + d)
                locks.append((k, d))
        if locks and cache is not None and cache.available:

            async def lock_op() -> Any:
                pipe = cache.client.pipeline(transaction=False)
                for k, d in locks:
                    pipe.set(k + ":lock", b"1", px=max(1, int(d * 1000)))
                return await pipe.execute()

            await cache.execute(lock_op)

    async def succeeded(self, username: str) -> None:
        """A correct password: forget the username's failures (the address keeps its count)."""
        [(_, k)] = self._keys(username, "")
        self.memory.clear(k)
        cache = self.cache
        if cache is not None and cache.available:
            await cache.execute(lambda: cache.client.delete(k, k + ":lock"))
