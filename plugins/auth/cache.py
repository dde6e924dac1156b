"""Auth's shared state in Redis, behind a circuit breaker; the in-memory denylist.

**Decision (measured, issue 13): token verification never waits for Redis.** Until then a
verify made one Redis round trip (cached claims? revoked?) before checking the signature. A
local HS256 check costs ≈ 16 µs (:mod:`.tokens`); the round trip cost far more: a redis-py
command is ≈ 120 µs of event-loop CPU here before any network wait, and under a handshake
burst the batched pipelines queued behind each other. ``aiwfe bench auth-burst --connects
5000`` (2 cores): connect p50 248 ms / p99 347 ms with Redis up against p99 64 ms in the same
run with Redis stopped (breaker open, signatures only). A claim cache cannot pay for itself
when it is slower than what it saves, and the asymmetric algorithms (RS256 ≈ 30 µs, EdDSA
≈ 60 µs) are no different. So a verify is: header and key, signature and registered
claims, then two in-memory sets — revoked ``jti`` (:class:`Denylist`) and users' cut-offs.

**What Redis is for** (every call with a short timeout; after one failure the breaker
skips Redis for ``retry_s``, one probe per interval, so a dead Redis costs nothing):

* the shared revocation list, a sorted set ``<prefix>:revocations`` (member ``<exp>:<jti>``,
  score the revocation time): the ``TokenRevoked`` event puts a revocation into every
  running pod's memory at once; the set is for a pod that starts later (it loads the set)
  and for one that missed the event while cut off from NATS (every pod re-reads what was
  added since its last read every ``subject_refresh_s``). Entries older than the longest
  token lifetime are dropped on write;
* users' cut-offs (``<prefix>:subjects``, :mod:`.admin`) and login throttling
  (:mod:`.throttle`, through :meth:`ClaimCache.execute`).

A revocation holds in the pod that made it at once and in every other pod once the event
reached it (about a millisecond on a healthy bus; at worst ``subject_refresh_s``). Redis down:
logouts still hold through the event, tokens verify exactly as with it up.
The class keeps its historical name; it holds no claims.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry  # the asyncio one: redis-py 8.2 warns when given the sync class
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, RedisError

from aiwfe.kernel.cancels import cancellations, raise_if_cancelled_since

from .store import Breaker

__all__ = ["ClaimCache", "Denylist"]

log = logging.getLogger("aiwfe.auth.cache")


class Denylist:
    """Revoked ``jti`` values held in memory until their token would have expired.

    Bounded by token lifetime: an entry lives no longer than its ``exp``; expired
    entries are pruned on every add (a heap keeps that O(log n)).
    """

    __slots__ = ("_exp", "_heap")

    def __init__(self) -> None:
        self._exp: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._exp)

    def add(self, jti: str, exp: int, *, now: float | None = None) -> None:
        """Deny ``jti`` until ``exp`` (epoch seconds)."""
        t = time.time() if now is None else now
        self._prune(t)
        if exp <= t:
            return
        if self._exp.get(jti, 0) < exp:
            self._exp[jti] = exp
            heapq.heappush(self._heap, (exp, jti))

    def __contains__(self, jti: str) -> bool:
        exp = self._exp.get(jti)
        return exp is not None and exp > time.time()

    def _prune(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            exp, jti = heapq.heappop(heap)
            if self._exp.get(jti) == exp:
                del self._exp[jti]


class ClaimCache:
    """Auth's Redis: the shared revocation list, users' cut-offs, a client for the throttle.

    Args:
        url: ``redis://...``; empty means no Redis (always degraded).
        key_prefix: namespace of every key.
        timeout_s: socket and per-operation timeout.
        retry_s: breaker open time after a failure.
        max_connections: Redis operations in flight at once; past it a call skips Redis.

    Every method swallows Redis failures (they open the breaker) and reports them through
    its return value, so callers never see a Redis exception.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        timeout_s: float = 0.2,
        retry_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.url = url
        self.max_connections = max_connections
        self._inflight = 0
        self.prefix = key_prefix
        self.timeout_s = timeout_s
        self.breaker = Breaker(retry_s)
        self.client: Any = None
        if url:
            self.client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again, not the client
                retry_on_error=[],
                health_check_interval=0,
                max_connections=max_connections,
            )

    @property
    def available(self) -> bool:
        """False when no Redis is configured or the breaker is open."""
        return self.client is not None and self.breaker.closed

    def status(self) -> str | None:
        """None when healthy, else why Redis is bypassed."""
        if self.client is None:
            return "no redis configured: shared revocation list disabled (revocations travel by event only)"
        if not self.breaker.closed:
            return f"redis unavailable ({self.breaker.last_error}): revocations travel by event only"
        return None

    async def close(self) -> None:
        """Close the connections."""
        if self.client is not None:
            await self.client.aclose()

    async def _run(self, op: Any) -> tuple[bool, Any]:
        """Run one Redis coroutine factory under the breaker; (ok, result).

        redis-py writes each command under ``asyncio.wait_for`` (a socket timeout is set),
        which on Python 3.11 (the images' Python) drops a cancellation that arrives during the
        write: the command then returns normally, and a cancelled login went on to hash the
        password and issue a token (nine cancellations in ten at that point, tested). So a
        cancellation counted while ``op`` ran raises ``CancelledError`` here, whatever ``op``
        returned, and never counts against the breaker.
        """
        if self.client is None or self._inflight >= self.max_connections or not self.breaker.allow():
            return False, None
        before = cancellations()
        self._inflight += 1
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                result = await op()
        except MaxConnectionsError:
            raise_if_cancelled_since(before)
            return False, None  # our own pool is saturated; Redis itself is fine
        except (RedisError, OSError, TimeoutError) as e:
            raise_if_cancelled_since(before)
            if self.breaker.closed:
                log.warning("auth: redis failed (%s); bypassing it for %.1f s at a time", type(e).__name__, self.breaker.open_s)
            self.breaker.failure(e if str(e) else type(e).__name__)
            return False, None
        finally:
            self._inflight -= 1
        raise_if_cancelled_since(before)
        self.breaker.success()
        return True, result

    async def execute(self, op: Any) -> tuple[bool, Any]:
        """Run ``op()`` (a coroutine factory using :attr:`client`) under the breaker; ``(ok, result)``.

        Never raises for Redis failures; ``ok`` is False when Redis was skipped or failed."""
        return await self._run(op)

    def _subjects_key(self) -> str:
        return f"{self.prefix}:subjects"

    async def revoke_subject(self, sub: str, before: int, ttl_s: int) -> bool:
        """Deny every token of ``sub`` issued at or before ``before`` for ``ttl_s`` (one field of
        the hash ``<prefix>:subjects``: ``before:expiry``, removed by :meth:`revoked_subjects`
        once expired); False when Redis did not answer."""
        exp = int(time.time()) + max(1, ttl_s)
        ok, _ = await self._run(lambda: self.client.hset(self._subjects_key(), sub, f"{before}:{exp}"))
        return ok

    async def revoked_subjects(self) -> dict[str, int] | None:
        """Every live subject cut-off in Redis (``sub → before``); expired ones are removed.
        None when Redis did not answer."""

        async def op() -> dict[str, int]:
            now = time.time()
            out: dict[str, int] = {}
            stale = []
            for field, value in (await self.client.hgetall(self._subjects_key())).items():
                before, _, exp = value.decode().partition(":")
                if exp and int(exp) > now:
                    out[field.decode()] = int(before)
                else:
                    stale.append(field)
            if stale:
                await self.client.hdel(self._subjects_key(), *stale)
            return out

        ok, res = await self._run(op)
        return res if ok else None

    def _revocations_key(self) -> str:
        return f"{self.prefix}:revocations"

    async def revoke(self, jti: str, exp: int, *, keep_s: float) -> bool:
        """Add ``jti`` (valid until ``exp``) to the shared revocation list and drop entries
        revoked more than ``keep_s`` ago (the longest token lifetime); False when Redis did
        not answer."""
        now = time.time()

        async def op() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(self._revocations_key(), {f"{exp}:{jti}": now})
            pipe.zremrangebyscore(self._revocations_key(), "-inf", now - keep_s)
            return await pipe.execute()

        ok, _ = await self._run(op)
        return ok

    async def revocations_since(self, since: float) -> list[tuple[str, int]] | None:
        """``(jti, exp)`` of every revocation added at or after ``since`` (epoch seconds, the
        revoking pod's clock); None when Redis did not answer."""

        async def op() -> list[tuple[str, int]]:
            out = []
            for member in await self.client.zrangebyscore(self._revocations_key(), since, "+inf"):
                exp, _, jti = member.decode().partition(":")
                if exp.isdigit() and jti:
                    out.append((jti, int(exp)))
            return out

        ok, res = await self._run(op)
        return res if ok else None

    async def load_revocations(self, into: Denylist, since: float = 0.0) -> bool:
        """Add the revocations stored at or after ``since`` to ``into``; False when Redis did
        not answer."""
        revoked = await self.revocations_since(since)
        for jti, exp in revoked or ():
            into.add(jti, exp)
        return revoked is not None
