"""Users in PostgreSQL: a bounded psycopg pool, migrations under an advisory lock.

Every query takes a connection for exactly one statement and gives it back: no
connection is held across KDF work or any other await. The pool is bounded
(``max_size``, ``max_waiting``, a short ``timeout``) and checks each connection on
checkout, so a connection broken by a database restart is never handed out.

Failures a caller sees:

* pool exhausted (all connections busy, or too many waiting) → :class:`~kernel.errors.Overloaded`;
* database unreachable → :class:`~kernel.errors.Unavailable`, at once while the breaker
  is open (see :class:`Breaker`), so an outage costs no one a pool timeout per request.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout, TooManyRequests

from aiwfe.kernel import pg
from aiwfe.kernel.errors import Overloaded, Unavailable

from .errors import UserExists

__all__ = ["USERNAME_RE", "Breaker", "User", "UserStore", "migrations"]

#: What registration allows (use ``fullmatch``: ``$`` would also pass "alice\n" beside "alice").
USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{3,64}")

log = logging.getLogger("aiwfe.auth.store")


class Breaker:
    """A circuit breaker: after a failure, skip the dependency for ``open_s``, then let one
    caller probe it while the others keep skipping; a success closes it.

    The clock is ``time.monotonic``; the breaker has no locks (the event loop is its
    only user).
    """

    __slots__ = ("_probe_at", "failures", "last_error", "open_s", "opened_at")

    def __init__(self, open_s: float) -> None:
        self.open_s = open_s
        self.opened_at: float | None = None
        self._probe_at = 0.0
        self.failures = 0
        self.last_error = ""

    @property
    def closed(self) -> bool:
        """True while the dependency is believed healthy."""
        return self.opened_at is None

    @property
    def blocking(self) -> bool:
        """True when :meth:`allow` would refuse now (open, and no probe due). Consumes nothing."""
        return self.opened_at is not None and time.monotonic() < self._probe_at

    def allow(self) -> bool:
        """True when the caller may use the dependency (closed, or this caller is the probe)."""
        if self.opened_at is None:
            return True
        now = time.monotonic()
        if now >= self._probe_at:
            self._probe_at = now + self.open_s  # one probe per interval
            return True
        return False

    def success(self) -> None:
        """The dependency answered: close the breaker."""
        self.opened_at = None

    def failure(self, error: BaseException | str) -> None:
        """The dependency failed: open (or keep open) the breaker."""
        now = time.monotonic()
        if self.opened_at is None:
            self.opened_at = now
        self._probe_at = now + self.open_s
        self.failures += 1
        self.last_error = str(error) or type(error).__name__


class User:
    """A user row (without touching the password hash outside this plugin)."""

    __slots__ = ("disabled", "id", "password_hash", "scopes", "username")

    def __init__(self, id: str, username: str, password_hash: str, scopes: list[str], disabled: bool = False) -> None:
        self.id = id
        self.username = username
        self.password_hash = password_hash
        self.scopes = scopes
        self.disabled = disabled


def migrations() -> list[tuple[str, str]]:
    """The plugin's migrations as ``(version, sql)``, in order (``migrations/NNNN_*.sql``)."""
    files = [f for f in resources.files("aiwfe.plugins.auth").joinpath("migrations").iterdir() if f.name.endswith(".sql")]
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in sorted(files, key=lambda f: f.name)]


def _lock_key(schema: str) -> int:
    """A signed 64-bit advisory lock key for this plugin's migrations in ``schema``.

    Per schema, so deployments sharing one database never wait on each other, and
    derived from SHA-256 so no other plugin's key collides by accident.
    """
    digest = hashlib.sha256(f"aiwfe.auth.migrations:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class UserStore:
    """The users table behind a bounded pool.

    Args:
        url: a libpq URL/conninfo (its ``options`` may set a ``search_path``).
        name: pool name (metric label).
        min_size, max_size: pool bounds.
        timeout_s: longest wait for a connection before Overloaded/Unavailable.
        max_waiting: callers allowed to wait for a connection; past it Overloaded at once.
        connect_timeout_s: TCP/libpq connect timeout of each new connection.
        outage_retry_s: how long the breaker fails calls at once after the database failed.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "auth",
        min_size: int = 1,
        max_size: int = 10,
        timeout_s: float = 2.0,
        max_waiting: int = 128,
        connect_timeout_s: float = 2.0,
        outage_retry_s: float = 1.0,
    ) -> None:
        self.url = url
        self.breaker = Breaker(outage_retry_s)
        self._m_query = pg.QUERY_SECONDS.labels(name)
        self.pool: AsyncConnectionPool[Any] | None = None
        self._pool_args: dict[str, Any] = {
            "name": name,
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout_s,
            "max_waiting": max_waiting,
            "kwargs": {"autocommit": True, "connect_timeout": max(1, round(connect_timeout_s))},
            "check": AsyncConnectionPool.check_connection,
            # Reconnection attempts back off up to this long before the pool gives a slot up.
            "reconnect_timeout": 60.0,
        }

    async def open(self, wait_timeout_s: float = 10.0) -> None:
        """Open the pool, wait for its first connections, apply migrations.

        Raises:
            Unavailable: the database did not answer within ``wait_timeout_s``.
        """
        self.pool = AsyncConnectionPool(self.url, open=False, **self._pool_args)
        try:
            await self.pool.open(wait=True, timeout=wait_timeout_s)
        except PoolTimeout as e:
            await self.pool.close()
            raise Unavailable(f"auth: database unreachable at start ({e})") from None
        pg.watch(self.pool)
        await self.migrate()

    async def close(self) -> None:
        """Close the pool (connections in use are closed when returned)."""
        if self.pool is not None:
            await self.pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection for one short unit of work.

        Raises:
            Overloaded: every connection is busy (pool timeout) or too many callers wait.
            Unavailable: the database is down (breaker open, connect or query failure).
        """
        pool = self.pool
        assert pool is not None, "UserStore.open() first"
        if not self.breaker.allow():
            raise Unavailable(f"auth: database unavailable ({self.breaker.last_error}); retry shortly")
        try:
            async with pg.pooled(pool) as conn:  # not pool.connection(): it can lose a cancellation
                yield conn
        except TooManyRequests:
            raise Overloaded("auth: too many requests waiting for a database connection; retry later") from None
        except PoolTimeout as e:
            stats = pool.get_stats()
            if stats.get("pool_size", 0) >= pool.max_size and stats.get("pool_available", 0) == 0 and self.breaker.closed:
                raise Overloaded(f"auth: database pool exhausted ({pool.max_size} connections busy); retry later") from None
            # The pool could not (re)open connections: the database is unreachable.
            self.breaker.failure(e)
            raise Unavailable("auth: database unavailable (no connection could be opened); retry shortly") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            self.breaker.failure(e)
            raise Unavailable(f"auth: database unavailable ({type(e).__name__}); retry shortly") from None
        else:
            self.breaker.success()

    async def migrate(self) -> list[str]:
        """Apply pending migrations under a transaction-scoped advisory lock; return those applied.

        Replicas starting together serialise on the lock; each reads the applied set
        only after taking it, so every migration runs exactly once per schema.
        """
        applied_now = []
        async with self.connection() as conn, conn.transaction():
            row = await (await conn.execute("SELECT current_schema()")).fetchone()
            schema = row[0] if row and row[0] else "public"
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS auth_migrations"
                " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT version FROM auth_migrations")
            done = {r[0] for r in await cur.fetchall()}
            for version, sql in migrations():
                if version in done:
                    continue
                await conn.execute(sql.encode())
                await conn.execute("INSERT INTO auth_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
        if applied_now:
            log.info("auth: applied migrations %s", ", ".join(applied_now))
        return applied_now

    async def create_user(self, username: str, password_hash: str, scopes: list[str]) -> str:
        """Insert a user; return its id.

        Raises:
            UserExists: the username is taken (case-insensitively).
            Overloaded, Unavailable: see :meth:`connection`.
        """
        user_id = str(uuid.uuid4())
        try:
            async with self.connection() as conn:
                with self._m_query.time():
                    await conn.execute(
                        "INSERT INTO auth_users (id, username, password_hash, scopes) VALUES (%s, %s, %s, %s)",
                        (user_id, username, password_hash, scopes),
                    )
        except pg_errors.UniqueViolation:
            raise UserExists(f"user {username!r} already exists") from None
        return user_id

    async def find_user(self, username: str) -> User | None:
        """The user named ``username`` (case-insensitively), or None.

        Raises:
            Overloaded, Unavailable: see :meth:`connection`.
        """
        if not USERNAME_RE.fullmatch(username):
            # No user's name (registration refuses it). Looked up, PostgreSQL's lower() could still match
            # one ("İvan" → "ivan") that login throttles under another key (str.lower gives "i̇van").
            return None
        async with self.connection() as conn:
            with self._m_query.time():
                cur = await conn.execute(
                    "SELECT id, username, password_hash, scopes, disabled FROM auth_users WHERE lower(username) = lower(%s)",
                    (username,),
                )
                row = await cur.fetchone()
        if row is None:
            return None
        return User(str(row[0]), row[1], row[2], list(row[3]), bool(row[4]))

    async def set_disabled(self, username: str, disabled: bool) -> tuple[str, str] | None:
        """Disable (or enable again) the user named ``username``; ``(id, username)`` or None
        when there is no such user.

        Raises:
            Overloaded, Unavailable: see :meth:`connection`.
        """
        if "\x00" in username:  # no user's name (registration allows none); PostgreSQL text cannot hold it
            return None
        async with self.connection() as conn:
            with self._m_query.time():
                cur = await conn.execute(
                    "UPDATE auth_users SET disabled = %s, updated_at = now() WHERE lower(username) = lower(%s)"
                    " RETURNING id, username",
                    (disabled, username),
                )
                row = await cur.fetchone()
        return (str(row[0]), row[1]) if row is not None else None

    async def delete_user(self, username: str) -> tuple[str, str] | None:
        """Delete the user named ``username``; ``(id, username)`` or None when there is none.

        Raises:
            Overloaded, Unavailable: see :meth:`connection`.
        """
        if "\x00" in username:  # no user's name (registration allows none); PostgreSQL text cannot hold it
            return None
        async with self.connection() as conn:
            with self._m_query.time():
                cur = await conn.execute(
                    "DELETE FROM auth_users WHERE lower(username) = lower(%s) RETURNING id, username", (username,)
                )
                row = await cur.fetchone()
        return (str(row[0]), row[1]) if row is not None else None

    async def update_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash (after a KDF parameter upgrade).

        Raises:
            Overloaded, Unavailable: see :meth:`connection`.
        """
        async with self.connection() as conn:
            with self._m_query.time():
                await conn.execute(
                    "UPDATE auth_users SET password_hash = %s, updated_at = now() WHERE id = %s", (password_hash, user_id)
                )
