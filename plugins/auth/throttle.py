"""Login throttling: attempts per username and per client address, exponential backoff.

Every login attempt counts against two keys: the (lower-cased) username, whether or not such a
user exists, and the client address the gateway saw. Attempts are counted when they are
**admitted**, before any database or hashing work, so a burst of parallel guesses cannot slip
past the allowance while the first ones are still hashing. The ``free``-th attempt within
``window_s`` and every one after it lock the key for ``base_s × 2^(attempts − free)`` seconds
(at most ``max_s``) as they are admitted: past the allowance one attempt per lock period gets
through. An attempt against a locked key is refused with :class:`~.errors.TooManyAttempts`
(HTTP 429, ``Retry-After``), and not counted. The refusal is the same for a user that exists and
one that does not, so throttling reveals nothing about who has an account. A successful login
clears its username's count and lock and takes its own attempt back from the address's count;
an attempt that failed for another reason than the password (overload, database down) is taken
back from both.

State lives in Redis (``<prefix>:throttle:{user,addr}:<sha256>`` and ``…:lock``, shared by every
auth pod, expiring by themselves; admission is one Lua script, atomic) **and** in this pod's
memory; an attempt must pass both. With Redis down (breaker open) the pod throttles on its own.
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
        """Count one attempt of ``key``; return its count within the window."""
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

    def uncount(self, key: str) -> None:
        """Take one attempt back (its lock, if it set one, stays)."""
        e = self._d.get(key)
        if e is not None:
            self._d[key] = (max(0, e[0] - 1), e[1], e[2])


# KEYS: count1, lock1[, count2, lock2]; ARGV: window_ms, base_ms, max_ms, free1[, free2].
# Returns {0, ms until the longest lock ends} (refused, nothing counted) or {1, 0} (admitted).
_ADMIT = """
local wait = 0
for i = 2, #KEYS, 2 do
  local t = redis.call('PTTL', KEYS[i])
  if t > wait then wait = t end
end
if wait > 0 then return {0, wait} end
for i = 1, #KEYS, 2 do
  local n = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  local free = tonumber(ARGV[4 + (i - 1) / 2])
  if n >= free then
    local d = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ math.min(n - free, 32))
    redis.call('SET', KEYS[i + 1], '1', 'PX', math.max(1, math.floor(d)))
  end
end
return {1, 0}
"""

# KEYS: counts to take one attempt back from (never below 0, never creating a key; TTLs kept).
_UNCOUNT = """
for i = 1, #KEYS do
  local n = tonumber(redis.call('GET', KEYS[i]))
  if n and n > 0 then redis.call('DECR', KEYS[i]) end
end
return 0
"""


class LoginThrottle:
    """The login attempt limits (see the module doc).

    Args:
        cache: the plugin's :class:`~.cache.ClaimCache` (its Redis client and breaker), or None.
        prefix: Redis key prefix.
        user_free, addr_free: attempts allowed per username / per address before backoff.
        base_s, max_s: first lock and longest lock.
        window_s: attempts older than this (since the last one) are forgotten.
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
        self.free = {"user": max(1, user_free), "addr": max(1, addr_free)}
        self.base_s = base_s
        self.max_s = max_s
        self.window_s = window_s
        self.memory = MemoryCounts(window_s)
        self._script: Any = None
        self._uncount: Any = None

    def _keys(self, username: str, addr: str) -> list[tuple[str, str]]:
        out = [("user", username.lower())]
        if addr:
            out.append(("addr", addr))
        return [(kind, f"{self.prefix}:throttle:{kind}:{hashlib.sha256(v.encode()).hexdigest()}") for kind, v in out]

    def delay_s(self, kind: str, attempts: int) -> float:
        """The lock set when the ``attempts``-th attempt of a key of ``kind`` is admitted (0 while free)."""
        over = attempts - self.free[kind]
        if over < 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(over, 32))

    def _redis(self) -> Any:
        cache = self.cache
        return cache if cache is not None and cache.available else None

    async def admit(self, username: str, addr: str) -> None:
        """Count a login attempt, or refuse it while its username or address is locked.

        Raises:
            TooManyAttempts: with ``retry_after_s``, the seconds until the lock ends (at least 1).
        """
        now = time.time()
        keys = self._keys(username, addr)
        wait = max(self.memory.locked_for(k, now) for _, k in keys)
        if wait > 0:
            raise self._refusal(wait)
        cache = self._redis()
        if cache is not None:
            if self._script is None:
                self._script = cache.client.register_script(_ADMIT)
            flat = [x for _, k in keys for x in (k, k + ":lock")]
            argv = [int(self.window_s * 1000), int(self.base_s * 1000), int(self.max_s * 1000)]
            argv += [self.free[kind] for kind, _ in keys]
            ok, res = await cache.execute(lambda: self._script(keys=flat, args=argv))
            if ok and int(res[0]) == 0:
                raise self._refusal(int(res[1]) / 1000)
        for kind, k in keys:  # this pod's own count: the limit when Redis is down
            d = self.delay_s(kind, self.memory.fail(k, now))
            if d > 0:
                self.memory.lock(k, now + d)

    @staticmethod
    def _refusal(wait_s: float) -> TooManyAttempts:
        return TooManyAttempts("too many failed logins; retry later", retry_after_s=float(max(1, math.ceil(wait_s))))

    async def succeeded(self, username: str, addr: str) -> None:
        """A correct password: clear the username's count and lock; take the attempt back from the address."""
        keys = self._keys(username, addr)
        (_, user_key), rest = keys[0], keys[1:]
        self.memory.clear(user_key)
        for _, k in rest:
            self.memory.uncount(k)
        cache = self._redis()
        if cache is not None:
            await cache.execute(lambda: cache.client.delete(user_key, user_key + ":lock"))
            if rest:
                await self._uncount_redis(cache, [k for _, k in rest])

    async def release(self, username: str, addr: str) -> None:
        """The attempt failed for another reason than the password: take it back from both keys."""
        keys = self._keys(username, addr)
        for _, k in keys:
            self.memory.uncount(k)
        cache = self._redis()
        if cache is not None:
            await self._uncount_redis(cache, [k for _, k in keys])

    async def _uncount_redis(self, cache: Any, keys: list[str]) -> None:
        if self._uncount is None:
            self._uncount = cache.client.register_script(_UNCOUNT)
        await cache.execute(lambda: self._uncount(keys=keys))
