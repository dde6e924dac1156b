"""Redis cache of expert answers.

The key is a SHA-256 of provider, model, role, prompt and context, so identical expert
prompts hit. A dead Redis must cost nothing per request: operations have a short
timeout and a circuit breaker skips Redis for ``open_s`` after a failure.
"""

from __future__ import annotations

import hashlib
import time

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter

from aiwfe.kernel.cancels import raise_if_cancelled_since
from aiwfe.kernel.metrics import REGISTRY

__all__ = ["CACHE", "AnswerCache"]

CACHE = Counter("aiwfe_helios_cache_total", "Helios expert-answer cache lookups by result", ["result"], registry=REGISTRY)


class _Entry(msgspec.Struct, frozen=True):
    answer: str
    confidence: float


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Entry)


class AnswerCache:
    """Expert answers in Redis at ``url`` under ``prefix``; ``url`` empty disables the cache."""

    def __init__(self, url: str, prefix: str, ttl_s: float, *, timeout_s: float = 0.2, open_s: float = 5.0) -> None:
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.open_s = open_s
        self._down_until = 0.0
        self.redis = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s) if url else None

    @staticmethod
    def key(provider: str, model: str, role: str, prompt: str, context: list[str]) -> str:
        """Cache key of one expert call."""
        h = hashlib.sha256()
        for part in (provider, model, role, prompt, *context):
            h.update(part.encode())
            h.update(b"\x00")
        return h.hexdigest()

    def _usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._down_until

    async def get(self, key: str) -> tuple[str, float] | None:
        """The cached (answer, confidence), or None (miss, or Redis unavailable)."""
        if not self._usable():
            CACHE.labels("unavailable").inc()
            return None
        assert self.redis is not None
        try:
            raw = await self.redis.get(self.prefix + key)
        except Exception:
            _reraise_cancel()
            self._down_until = time.monotonic() + self.open_s
            CACHE.labels("unavailable").inc()
            return None
        _reraise_cancel()
        if raw is None:
            CACHE.labels("miss").inc()
            return None
        CACHE.labels("hit").inc()
        e = _dec.decode(raw if isinstance(raw, bytes) else raw.encode())
        return e.answer, e.confidence

    async def put(self, key: str, answer: str, confidence: float) -> None:
        """Store an answer (best effort)."""
        if not self._usable():
            return
        assert self.redis is not None
        try:
            await self.redis.set(self.prefix + key, _enc.encode(_Entry(answer, confidence)), px=int(self.ttl_s * 1000))
        except Exception:
            _reraise_cancel()
            self._down_until = time.monotonic() + self.open_s
        _reraise_cancel()

    async def close(self) -> None:
        """Close the connection pool."""
        if self.redis is not None:
            await self.redis.aclose()


def _reraise_cancel() -> None:
    """Raise CancelledError when this task is being cancelled: redis-py can lose a
    cancellation that arrives mid-command (seen: the command returns normally, or fails
    with a connection error), and the expert would then go on to call its model after the
    job was cancelled. Checked after every Redis await (:mod:`aiwfe.kernel.cancels`)."""
    raise_if_cancelled_since(0)
