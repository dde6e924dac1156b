"""Login throttling: attempts per username and per client address, exponential backoff.

Every login attempt counts against two keys: the (lower-cased) username, whether or not such a
user exists, and the client address the gateway saw. A key's count is its attempts within
``window_s`` that were not given back: a successful login clears its username's count and lock
and gives its attempt back to the address; an attempt that failed for another reason than the
password (overload, database down) is given back to both. So the count is the failures plus
the attempts still in flight.

* Once a key has ``free`` or more, it is locked for ``base_s × 2^(count − free)`` seconds (at most
  ``max_s``). An attempt on a locked key is refused, and not counted, with
  :class:`~.errors.TooManyAttempts` (HTTP 429, ``Retry-After``: when the lock ends).
* Attempts are counted when they are admitted, before any database or hashing work. On a key
  that has failed within the window ("dirty"), the attempt that reaches ``free`` sets the lock
  as it is admitted, so parallel guesses cannot slip past the allowance while the first ones
  still hash: one attempt per lock period gets through. A clean key (no failure in the window)
  admits a burst of correct logins as a whole; a burst of wrong guesses on a clean key is
  bounded by the handlers' concurrency once, then locked by its own failures.

The refusal is the same for a user that exists and one that does not, so throttling reveals
nothing about who has an account.

State lives in Redis (``<prefix>:throttle:{user,addr}:<sha256>`` with ``…:lock`` and
``…:dirty``, shared by every auth pod, expiring by themselves; admission and failure are one Lua
script each, atomic) **and** in this pod's memory; an attempt must pass both. With Redis down
(breaker open) the pod throttles on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from typing import Any

from .errors import TooManyAttempts

__all__ = ["LoginThrottle", "MemoryCounts"]


class _Entry:
    __slots__ = ("count", "dirty", "last", "until")

    def __init__(self, now: float) -> None:
        self.count = 0
        self.last = now
        self.until = 0.0
        self.dirty = False


class MemoryCounts:
    """Attempt counts, dirty flags and lock expiries in memory, bounded to ``max_keys`` (oldest
    unlocked key out)."""

    __slots__ = ("_d", "max_keys", "window_s")

    def __init__(self, window_s: float, max_keys: int = 100_000) -> None:
        self.window_s = window_s
        self.max_keys = max_keys
        self._d: OrderedDict[str, _Entry] = OrderedDict()

    def _get(self, key: str, now: float) -> _Entry:
        e = self._d.pop(key, None)
        if e is None or (now - e.last > self.window_s and e.until <= now):
            e = _Entry(now)
        self._d[key] = e
        while len(self._d) > self.max_keys:
            self._evict(now)
        return e

    def _evict(self, now: float) -> None:
        """Drop the oldest key, passing over (to the newest end) up to 8 that are still locked: a
        flood of new names must not unlock a name while Redis is down (it did: one entry per name)."""
        d = self._d
        for _ in range(8):
            key, e = d.popitem(last=False)
            if e.until <= now:
                return
            d[key] = e
        d.popitem(last=False)

    def locked_for(self, key: str, now: float) -> float:
        """Seconds ``key`` stays locked (0 when it is not)."""
        e = self._d.get(key)
        return max(0.0, e.until - now) if e is not None else 0.0

    def count(self, key: str, now: float) -> tuple[int, bool]:
        """Count one attempt of ``key``; return its count within the window and whether it is dirty."""
        e = self._get(key, now)
        e.count += 1
        e.last = now
        return e.count, e.dirty

    def failed(self, key: str, now: float) -> int:
        """Mark ``key`` dirty (a password failure); return its count."""
        e = self._get(key, now)
        e.dirty = True
        e.last = now
        return e.count

    def lock(self, key: str, until: float) -> None:
        e = self._d.get(key)
        if e is not None and until > e.until:
            e.until = until

    def clear(self, key: str) -> None:
        self._d.pop(key, None)

    def uncount(self, key: str) -> None:
        """Give one attempt back (a lock it set stays)."""
        e = self._d.get(key)
        if e is not None:
            e.count = max(0, e.count - 1)


# KEYS: count, lock, dirty per key (3 each); ARGV: window_ms, base_ms, max_ms, then free per key.
# Returns {0, ms until the longest lock ends} (refused, nothing counted) or {1, 0} (admitted).
_ADMIT = """
local wait = 0
for i = 1, #KEYS, 3 do
  local t = redis.call('PTTL', KEYS[i + 1])
  if t > wait then wait = t end
end
if wait > 0 then return {0, wait} end
for i = 1, #KEYS, 3 do
  local n = redis.call('INCR', KEYS[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  local free = tonumber(ARGV[4 + (i - 1) / 3])
  if n >= free and redis.call('EXISTS', KEYS[i + 2]) == 1 then
    local d = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ math.min(n - free, 32))
    redis.call('SET', KEYS[i + 1], '1', 'PX', math.max(1, math.floor(d)))
  end
end
return {1, 0}
"""

# A password failure. KEYS and ARGV as for _ADMIT. Marks each key dirty and locks it when its
# count has reached its allowance (a lock only ever grows).
_FAILED = """
for i = 1, #KEYS, 3 do
  redis.call('SET', KEYS[i + 2], '1', 'PX', ARGV[1])
  local n = tonumber(redis.call('GET', KEYS[i])) or 0
  local free = tonumber(ARGV[4 + (i - 1) / 3])
  if n >= free then
    local d = math.max(1, math.floor(math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ math.min(n - free, 32))))
    if redis.call('PTTL', KEYS[i + 1]) < d then redis.call('SET', KEYS[i + 1], '1', 'PX', d) end
  end
end
return 0
"""

# KEYS: counts to give one attempt back to (never below 0, never creating a key; TTLs kept).
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
        user_free, addr_free: attempts allowed per username / per address before backoff
            (``addr_free`` 0: no per-address limit).
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
        self.by_addr = addr_free > 0  # 0: no per-address limit (e.g. every client behind one proxy)
        self.base_s = base_s
        self.max_s = max_s
        self.window_s = window_s
        self.memory = MemoryCounts(window_s)
        self._scripts: dict[str, Any] = {}

    def _keys(self, username: str, addr: str) -> list[tuple[str, str]]:
        out = [("user", username.lower())]
        if addr and self.by_addr:
            out.append(("addr", addr))
        return [(kind, f"{self.prefix}:throttle:{kind}:{hashlib.sha256(v.encode()).hexdigest()}") for kind, v in out]

    def delay_s(self, kind: str, count: int) -> float:
        """The lock of a key of ``kind`` whose count is ``count`` (0 while below its allowance)."""
        over = count - self.free[kind]
        if over < 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(over, 32))

    def _redis(self) -> Any:
        cache = self.cache
        return cache if cache is not None and cache.available else None

    async def _script(self, cache: Any, name: str, source: str, keys: list[str], args: list[int]) -> tuple[bool, Any]:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = cache.client.register_script(source)
        ok, res = await cache.execute(lambda: script(keys=keys, args=args))
        return ok, res

    def _script_args(self, keys: list[tuple[str, str]]) -> tuple[list[str], list[int]]:
        flat = [x for _, k in keys for x in (k, k + ":lock", k + ":dirty")]
        argv = [int(self.window_s * 1000), int(self.base_s * 1000), int(self.max_s * 1000)]
        return flat, argv + [self.free[kind] for kind, _ in keys]

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
            try:
                ok, res = await self._script(cache, "admit", _ADMIT, *self._script_args(keys))
            except asyncio.CancelledError:
                # Redis runs the script once the command is written, so a cancellation while
                # waiting for its reply (or one redis-py lost during the write, re-raised by the
                # cache) left this attempt counted, and login() gives back only attempts that
                # admit() returned: give it back here, like any attempt not settled by a password.
                await self._script(cache, "uncount", _UNCOUNT, [k for _, k in keys], [])
                raise
            if ok and int(res[0]) == 0:
                raise self._refusal(int(res[1]) / 1000)
        for kind, k in keys:  # this pod's own count: the limit when Redis is down
            n, dirty = self.memory.count(k, now)
            if dirty and (d := self.delay_s(kind, n)) > 0:
                self.memory.lock(k, now + d)

    async def failed(self, username: str, addr: str) -> None:
        """The password was wrong (or the user unknown or disabled): mark both keys dirty and
        lock those that reached their allowance."""
        now = time.time()
        keys = self._keys(username, addr)
        for kind, k in keys:
            if (d := self.delay_s(kind, self.memory.failed(k, now))) > 0:
                self.memory.lock(k, now + d)
        cache = self._redis()
        if cache is not None:
            await self._script(cache, "failed", _FAILED, *self._script_args(keys))

    @staticmethod
    def _refusal(wait_s: float) -> TooManyAttempts:
        return TooManyAttempts("too many failed logins; retry later", retry_after_s=float(max(1, math.ceil(wait_s))))

    async def succeeded(self, username: str, addr: str) -> None:
        """A correct password: clear the username's count, lock and dirt; give the attempt back to the address."""
        keys = self._keys(username, addr)
        (_, user_key), rest = keys[0], keys[1:]
        self.memory.clear(user_key)
        for _, k in rest:
            self.memory.uncount(k)
        cache = self._redis()
        if cache is not None:
            await cache.execute(lambda: cache.client.delete(user_key, user_key + ":lock", user_key + ":dirty"))
            if rest:
                await self._script(cache, "uncount", _UNCOUNT, [k for _, k in rest], [])

    async def release(self, username: str, addr: str) -> None:
        """The attempt failed for another reason than the password: give it back to both keys."""
        keys = self._keys(username, addr)
        for _, k in keys:
            self.memory.uncount(k)
        cache = self._redis()
        if cache is not None:
            await self._script(cache, "uncount", _UNCOUNT, [k for _, k in keys], [])
