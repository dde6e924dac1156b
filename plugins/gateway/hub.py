"""The open WebSockets and event streams of one gateway, by token id, and the tokens revoked meanwhile.

An event stream (``GET /v1/jobs/{id}/events``, :class:`Held`) ends as a WebSocket closes: when its
token is revoked, its user disabled or deleted, its token expires, or the gateway stops; it was
authorised once, at its start, so without this a disabled user kept receiving its job's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .frames import CLOSE_GOING_AWAY, CLOSE_REVOKED

__all__ = ["Held", "Hub", "Socket"]


class Socket(Protocol):
    """What the hub needs of a connection (:class:`aiwfe.plugins.gateway.ws.Connection`)."""

    jti: str
    sub: str
    finished: asyncio.Event

    def close_soon(self, code: int, reason: str) -> None:
        """Close the socket with ``code`` from any task (idempotent)."""


class Hub:
    """The open connections of one gateway, by token id (``jti``)."""

    def __init__(self) -> None:
        self.by_jti: dict[str, set[Socket]] = {}
        self.revoked: dict[str, float] = {}  # jti → exp (epoch seconds); pruned as they expire
        self.per_sub: dict[str, int] = {}  # sockets per user, handshakes under way included
        # Event streams being sent (not counted by count(): no socket of /ready). Weak: a stream whose
        # task was cancelled outside its __anext__ is never told it ended; dropped, it gives its place back (__del__).
        self.streams: weakref.WeakSet[Held] = weakref.WeakSet()

    def hold(self, sub: str, limit: int) -> bool:
        """Take one of user ``sub``'s ``limit`` sockets (False: all are taken); :meth:`release` gives it back."""
        n = self.per_sub.get(sub, 0)
        if n >= limit:
            return False
        self.per_sub[sub] = n + 1
        return True

    def release(self, sub: str) -> None:
        """Give back a socket :meth:`hold` took."""
        n = self.per_sub.get(sub, 0) - 1
        if n > 0:
            self.per_sub[sub] = n
        else:
            self.per_sub.pop(sub, None)

    def add(self, conn: Socket) -> None:
        """Register an accepted connection."""
        self.by_jti.setdefault(conn.jti, set()).add(conn)

    def remove(self, conn: Socket) -> None:
        """Forget a connection (idempotent)."""
        conns = self.by_jti.get(conn.jti)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_jti[conn.jti]

    def count(self) -> int:
        """Open connections."""
        return sum(len(c) for c in self.by_jti.values())

    def is_revoked(self, jti: str) -> bool:
        """True when ``jti`` was revoked and has not expired yet."""
        exp = self.revoked.get(jti)
        return exp is not None and exp > time.time()

    def revoke(self, jti: str, exp: float) -> int:
        """Remember ``jti`` as revoked until ``exp`` and close its sockets with 4001; return how many."""
        now = time.time()
        self.revoked[jti] = exp
        if len(self.revoked) > 10_000:
            self.revoked = {j: e for j, e in self.revoked.items() if e > now}
        conns: list[Socket | Held] = [*self.by_jti.get(jti, ()), *(h for h in self.streams if h.jti == jti)]
        for c in conns:
            c.close_soon(CLOSE_REVOKED, "token revoked")
        return len(conns)

    def revoke_subject(self, sub: str) -> int:
        """Close every socket of user ``sub`` with 4001 (the user was disabled or deleted); return how many."""
        conns: list[Socket | Held] = [c for cs in self.by_jti.values() for c in cs if c.sub == sub]
        conns += [h for h in self.streams if h.sub == sub]
        for c in conns:
            c.close_soon(CLOSE_REVOKED, "user disabled or deleted")
        return len(conns)

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers to finish, up to 5 s."""
        for h in list(self.streams):
            h.close_soon(code, reason)
        conns = [c for cs in self.by_jti.values() for c in cs]
        for c in conns:
            c.close_soon(code, reason)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.finished.wait()) for c in conns], timeout=5.0)


class Held:
    """An event stream that holds one of its user's long-lived connections (:meth:`Hub.hold`,
    as a WebSocket does) and gives it back once, however it ends: exhausted, failed, cancelled
    by a disconnect, or dropped before it was ever iterated (its response never sent).

    While it is being sent it is one of the hub's streams (from its first event on, so that a
    response never sent is not kept alive by the hub) and ends like a WebSocket of token ``jti``
    of user ``sub``: :meth:`close_soon` (a revoked token, a disabled user, shutdown) or its
    token's expiry ``exp`` (epoch seconds; 0: none) ends it at once, also while it waits for
    the job's next event; no event is sent after that."""

    __slots__ = ("__weakref__", "_closed", "_hub", "_it", "_sub", "_timer", "_waiting", "exp", "jti", "sub")

    def __init__(self, hub: Hub, sub: str, it: AsyncIterator[Any], jti: str = "", exp: float = 0.0) -> None:
        self._hub, self._sub, self._it = hub, sub, it
        self.sub, self.jti, self.exp = sub, jti, exp
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._waiting: asyncio.Task[Any] | None = None  # the task awaiting the next event, woken by close_soon

    def __aiter__(self) -> Held:
        return self

    async def __anext__(self) -> Any:
        hub = self._hub
        if hub is not None and self not in hub.streams:  # the first event: the response is being sent
            hub.streams.add(self)
            self._closed = self._closed or hub.is_revoked(self.jti)
            if self.exp:
                left_s = max(0.0, self.exp - time.time())
                self._timer = asyncio.get_running_loop().call_later(left_s, _expire, weakref.ref(self))  # weak, as above
        if self._closed:
            await self._end()
        self._waiting = task = asyncio.current_task()
        try:
            item = await self._it.__anext__()
        except asyncio.CancelledError:
            # close_soon's own cancellation is taken back (the stream ends, its task goes on); any
            # other (a disconnect, anyio's cancel scope) that came with it goes on.
            if not self._closed or task is None or task.uncancel() > 0:
                self.release()
                raise
            await self._end()
        except BaseException:
            self.release()
            raise
        finally:
            self._waiting = None
        if self._closed:  # closed while the event was on its way: not sent
            await self._end()
        return item

    async def _end(self) -> None:
        self.release()
        aclose = getattr(self._it, "aclose", None)
        if aclose is not None:  # the job's consumer is given back now, not when the generator is collected
            with contextlib.suppress(Exception):
                await aclose()
        raise StopAsyncIteration

    def close_soon(self, code: int, reason: str) -> None:
        """End the stream (``code`` and ``reason`` are the WebSocket's; a stream has none to send)."""
        if self._closed:
            return
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()

    def release(self) -> None:
        """Give the connection back (idempotent)."""
        hub, self._hub = self._hub, None  # type: ignore[assignment]
        if self._timer is not None:
            self._timer.cancel()
        if hub is not None:
            hub.streams.discard(self)
            hub.release(self._sub)

    def __del__(self) -> None:
        self.release()


def _expire(ref: weakref.ref[Held]) -> None:
    held = ref()
    if held is not None:
        held.close_soon(CLOSE_REVOKED, "token expired")
