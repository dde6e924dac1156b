"""The open WebSockets of one gateway, by token id, and the tokens revoked meanwhile."""

from __future__ import annotations

import asyncio
import time
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
        conns = list(self.by_jti.get(jti, ()))
        for c in conns:
            c.close_soon(CLOSE_REVOKED, "token revoked")
        return len(conns)

    def revoke_subject(self, sub: str) -> int:
        """Close every socket of user ``sub`` with 4001 (the user was disabled or deleted); return how many."""
        conns = [c for cs in self.by_jti.values() for c in cs if c.sub == sub]
        for c in conns:
            c.close_soon(CLOSE_REVOKED, "user disabled or deleted")
        return len(conns)

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers to finish, up to 5 s."""
        conns = [c for cs in self.by_jti.values() for c in cs]
        for c in conns:
            c.close_soon(code, reason)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.finished.wait()) for c in conns], timeout=5.0)


class Held:
    """An event stream that holds one of its user's long-lived connections (:meth:`Hub.hold`,
    as a WebSocket does) and gives it back once, however it ends: exhausted, failed, cancelled
    by a disconnect, or dropped before it was ever iterated (its response never sent)."""

    __slots__ = ("_hub", "_it", "_sub")

    def __init__(self, hub: Hub, sub: str, it: AsyncIterator[Any]) -> None:
        self._hub, self._sub, self._it = hub, sub, it

    def __aiter__(self) -> Held:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._it.__anext__()
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Give the connection back (idempotent)."""
        hub, self._hub = self._hub, None  # type: ignore[assignment]
        if hub is not None:
            hub.release(self._sub)

    def __del__(self) -> None:
        self.release()
