"""Redis claim cache and revocation list, behind a circuit breaker; the in-memory denylist.

Redis is an optimisation and a shared revocation list, never a dependency of a valid
token: every Redis call has a short timeout, and after one failure the breaker skips
Redis for ``retry_s`` (one probe per interval), so a dead Redis costs nothing per request.
Keys: ``<prefix>:claims:<sha256 of token>`` and ``<prefix>:revoked:<jti>``, both expiring
with the token.

Lookups and stores are batched: one pipeline (the pending ``SET``s, then one ``MGET`` of
every pending lookup's keys) is in flight at a time, and what arrives meanwhile goes into
the next one. An idle cache sends a lone lookup at once (one loop iteration later); a
burst shares round trips. A redis-py command costs ≈ 120 µs of event-loop CPU here, so a
fresh token's lookup plus store was ≈ 240 µs of the ≈ 320 µs a verify took; batched, a
handshake burst of 2,000 tokens in one second costs a few dozen pipelines. Stores are not
awaited by the verifier: the claims are valid whether or not Redis took them.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, RedisError
from redis.retry import Retry

from .contract import Claims
from .store import Breaker

__all__ = ["ClaimCache", "Denylist"]

log = logging.getLogger("aiwfe.auth.cache")

_claims_enc = msgspec.msgpack.Encoder()
_claims_dec = msgspec.msgpack.Decoder(Claims)


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
    """Verified claims and revocations in Redis.

    Args:
        url: ``redis://...``; empty means no Redis (always degraded).
        key_prefix: namespace of every key.
        timeout_s: socket and per-operation timeout.
        retry_s: breaker open time after a failure.
        max_connections: Redis operations in flight at once; past it a call skips Redis
            (a burst is served from signatures rather than queued behind the cache).
        on_store_lost: called with the number of stores a failed batch lost.

    Every method swallows Redis failures (they open the breaker) and reports them
    through its return value (or ``on_store_lost``), so callers never see a Redis exception.
    """

    #: Most lookups in one pipeline (their keys go in one MGET); the rest wait for the next.
    MAX_BATCH = 512

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str,
        timeout_s: float = 0.2,
        retry_s: float = 2.0,
        max_connections: int = 64,
        on_store_lost: Callable[[int], None] | None = None,
    ) -> None:
        self.url = url
        self.on_store_lost = on_store_lost
        self._lookups: list[tuple[list[str], asyncio.Future[list[Any] | None]]] = []
        self._stores: list[tuple[str, bytes, int]] = []
        self._flusher: asyncio.Task[None] | None = None
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
        """None when healthy, else why the cache is bypassed."""
        if self.client is None:
            return "no redis configured: claims cache and shared revocation list disabled"
        if not self.breaker.closed:
            return f"redis unavailable ({self.breaker.last_error}): verifying from signatures and the in-memory denylist"
        return None

    async def close(self) -> None:
        """Send what is pending (for at most ``2 × timeout_s``), then close the connections."""
        flusher = self._flusher
        if flusher is not None:
            await asyncio.wait([flusher], timeout=self.timeout_s * 2)
            flusher.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def _run(self, op: Any) -> tuple[bool, Any]:
        """Run one Redis coroutine factory under the breaker; (ok, result)."""
        if self.client is None or self._inflight >= self.max_connections or not self.breaker.allow():
            return False, None
        self._inflight += 1
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                result = await op()
        except MaxConnectionsError:
            return False, None  # our own pool is saturated; Redis itself is fine
        except (RedisError, OSError, TimeoutError) as e:
            if self.breaker.closed:
                log.warning("auth: redis failed (%s); bypassing it for %.1f s at a time", type(e).__name__, self.breaker.open_s)
            self.breaker.failure(e if str(e) else type(e).__name__)
            return False, None
        finally:
            self._inflight -= 1
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

    def _claims_key(self, digest: str) -> str:
        return f"{self.prefix}:claims:{digest}"

    def _revoked_key(self, jti: str) -> str:
        return f"{self.prefix}:revoked:{jti}"

    async def lookup(self, digest: str, jti_hint: str | None) -> tuple[bool, Claims | None, bool]:
        """Cached claims for a token digest, and whether ``jti_hint`` is revoked (batched).

        ``jti_hint`` is read from the token's payload without verification; it equals the
        cached claims' ``jti`` whenever those exist (same digest, same payload).
        Returns ``(redis_ok, claims or None, revoked)``.
        """
        if self.client is None or self.breaker.blocking:
            return False, None, False
        keys = [self._claims_key(digest)]
        if jti_hint:
            keys.append(self._revoked_key(jti_hint))
        fut: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        self._lookups.append((keys, fut))
        self._kick()
        values = await fut
        if values is None:
            return False, None, False
        claims = None
        if values[0] is not None:
            try:
                claims = _claims_dec.decode(values[0])
            except msgspec.DecodeError:
                claims = None
        revoked = len(values) > 1 and values[1] is not None
        return True, claims, revoked

    def _kick(self) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send pending lookups and stores, one pipeline at a time, until none are left."""
        lookups: list[tuple[list[str], asyncio.Future[list[Any] | None]]] = []
        try:
            while self._lookups or self._stores:
                lookups, self._lookups = self._lookups[: self.MAX_BATCH], self._lookups[self.MAX_BATCH :]
                stores, self._stores = self._stores, []
                keys = [k for ks, _ in lookups for k in ks]

                async def op(keys: list[str] = keys, stores: list[tuple[str, bytes, int]] = stores) -> Any:
                    # Stores first: a lookup queued after a store sees it (read your writes).
                    pipe = self.client.pipeline(transaction=False)
                    for key, value, ttl_s in stores:
                        pipe.set(key, value, ex=ttl_s)
                    if keys:
                        pipe.mget(keys)
                    return await pipe.execute()

                ok, results = await self._run(op)
                values: list[Any] = results[-1] if ok and keys else []
                i = 0
                for ks, fut in lookups:
                    if not fut.done():
                        fut.set_result(values[i : i + len(ks)] if ok else None)
                    i += len(ks)
                if not ok and stores and self.on_store_lost is not None:
                    self.on_store_lost(len(stores))
        finally:
            self._flusher = None
            for _, fut in [*lookups, *self._lookups]:  # cancelled or broken: nobody waits forever
                if not fut.done():
                    fut.set_result(None)
            self._lookups.clear()

    async def is_revoked(self, jti: str) -> bool | None:
        """Whether ``jti`` is on the shared revocation list; None when Redis did not answer."""
        ok, n = await self._run(lambda: self.client.exists(self._revoked_key(jti)))
        return bool(n) if ok else None

    def store(self, digest: str, claims: Claims) -> None:
        """Cache verified claims until the token expires (queued for the next batch; a lost
        batch is reported through ``on_store_lost``)."""
        ttl_s = claims.exp - int(time.time())
        if ttl_s <= 0 or self.client is None or self.breaker.blocking:
            return
        self._stores.append((self._claims_key(digest), _claims_enc.encode(claims), ttl_s))
        self._kick()

    async def revoke(self, digest: str, jti: str, exp: int) -> bool:
        """Put ``jti`` on the shared revocation list until ``exp`` and drop the token's cached
        claims; False when Redis did not answer."""
        ttl_s = max(1, exp - int(time.time()))

        async def op() -> Any:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._revoked_key(jti), b"1", ex=ttl_s)
            pipe.delete(self._claims_key(digest))
            return await pipe.execute()

        ok, _ = await self._run(op)
        return ok
