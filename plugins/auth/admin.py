"""Admin operations of the auth plugin: disable, enable and delete users.

**Who is an admin.** A user whose name (case-insensitively) is in the plugin's ``admin_users``
setting or the ``AIWFE_ADMIN_USERS`` environment variable (comma-separated); both lists count.
Nobody is an admin by default. Being an admin is decided on each call, in one place
(:meth:`AdminOps.identity`): the caller's token is verified (and not revoked), its user's name
is in the list, and the user's row says it exists, is the token's subject and is not
disabled. So removing a name from the list takes effect at the next restart, and disabling an
admin takes its rights away at once, even on a pod that missed the cut-off below. Other
services ask with ``auth.whoami`` (:class:`~.contract.WhoAmI`, answered by :meth:`AdminOps.whoami`
and never cached): the gateway's admin and console routes do. Why a request and not an
``admin`` claim in the token or in :class:`~.contract.Claims`: a claim would outlive a
disable or a change of the list for as long as the token lives, while the request reads the
row each time (a claim would also have to be carried through the verify path, which serves
every request of every user; admin checks are rare).

**Revocation.** Disabling or deleting a user cuts off every token of that user issued so far:
a cut-off ``sub → before`` (epoch seconds) is written to Redis (a field of the hash
``<prefix>:subjects``, dropped once the last such token has expired) and broadcast as :class:`~.contract.SubjectRevoked`;
every auth pod holds it in memory (:class:`SubjectDenylist`) and refuses a token of ``sub``
with ``iat ≤ before``, and the gateway closes that user's sockets
with 4001. A pod that starts later loads the cut-offs from Redis, and every pod re-reads them
every ``subject_refresh_s`` (so one that missed the event catches up within that). A disabled user cannot log
in (answered like a wrong password); enabling it again lets it log in, but tokens from before
the disable stay revoked. Token times are whole seconds, so a token issued in the same second
as the cut-off is dated one second later (``iat``/``nbf``, well inside the verifier's leeway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from aiwfe.kernel.errors import Forbidden
from aiwfe.kernel.plugin import serves

from .contract import DeleteUser, DisableUser, Identity, SubjectRevoked, UserUpdated, WhoAmI
from .errors import UnknownUser

__all__ = ["AdminOps", "SubjectDenylist", "admin_names"]

log = logging.getLogger("aiwfe.auth")


def admin_names(configured: list[str]) -> frozenset[str]:
    """The admins' user names, lower-cased: ``configured`` plus ``$AIWFE_ADMIN_USERS``."""
    env = os.environ.get("AIWFE_ADMIN_USERS", "")
    return frozenset(n.strip().lower() for n in [*configured, *env.split(",")] if n.strip())


class SubjectDenylist:
    """Per-user token cut-offs held in memory until the last affected token expires.

    Each change gets a sequence number (:attr:`seq` is the latest), so a login can ask for the
    cut-offs it knew when it read the user's row (:meth:`before`): one that arrived later must
    not date its token after itself.
    """

    __slots__ = ("_d", "seq")

    def __init__(self) -> None:
        self._d: dict[str, tuple[int, int, int]] = {}  # sub → (before, exp, seq of the last change)
        self.seq = 0

    def __len__(self) -> int:
        return len(self._d)

    def add(self, sub: str, before: int, exp: int) -> None:
        """Deny tokens of ``sub`` issued at or before ``before`` until ``exp``."""
        now = time.time()
        if len(self._d) > 10_000:
            self._d = {s: v for s, v in self._d.items() if v[1] > now}
        old = self._d.get(sub)
        if exp > now and (old is None or old[0] < before or old[1] < exp):
            self.seq += 1
            self._d[sub] = (max(before, old[0] if old else 0), max(exp, old[1] if old else 0), self.seq)

    def before(self, sub: str, known_by: int | None = None) -> int | None:
        """The cut-off of ``sub`` (epoch seconds), or None; with ``known_by`` (a past :attr:`seq`),
        None also when the cut-off changed after it."""
        v = self._d.get(sub)
        if v is None or v[1] <= time.time() or (known_by is not None and v[2] > known_by):
            return None
        return v[0]

    def denies(self, sub: str, iat: int) -> bool:
        """True when a token of ``sub`` issued at ``iat`` is cut off."""
        v = self._d.get(sub)
        return v is not None and iat <= v[0] and v[1] > time.time()


class AdminOps:
    """Handlers of ``auth.whoami``, ``auth.disable_user``, ``auth.delete_user`` and
    ``auth.subject_revoked``, mixed into :class:`~.plugin.AuthPlugin` (which provides the attributes used here)."""

    subjects: SubjectDenylist
    admins: frozenset[str]
    store: Any
    cache: Any
    kernel: Any
    config: Any

    async def _verify(self, token: str, *, check_revoked: bool) -> Any: ...  # provided by the plugin

    async def load_cutoffs(self) -> bool:
        """Add every cut-off kept in Redis to this pod's memory; False when Redis did not answer."""
        cutoffs = await self.cache.revoked_subjects()
        ttl_s = int(self.config.access_ttl_s + self.config.leeway_s) + 1
        for sub, before in (cutoffs or {}).items():
            self.subjects.add(sub, before, before + ttl_s)
        return cutoffs is not None

    async def refresh_cutoffs(self, every_s: float) -> None:
        """Re-read the cut-offs every ``every_s`` (runs until cancelled): a pod that missed a
        ``SubjectRevoked`` event (disconnected from NATS at that moment) catches up within it."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.load_cutoffs()
            except Exception as e:  # never let the loop die; Redis errors are already swallowed
                log.warning("auth: reloading user cut-offs failed: %s", e)

    async def identity(self, token: str) -> Identity:
        """The token's user now, and whether it is an admin (see the module docstring).

        Raises:
            InvalidToken: the token does not verify or is revoked.
            Unavailable, Overloaded: an admin's row could not be read (rights are never
            granted unchecked); a non-admin's row is never read.
        """
        claims = await self._verify(token, check_revoked=True)
        listed = claims.username.lower() in self.admins
        if not listed:  # no database read for everyone else: a loop on /v1/console/me by any user
            # must not hold auth's connection pool (logins need it); a disabled user's tokens are
            # refused by the cut-off above
            return Identity(user_id=claims.sub, username=claims.username)
        user = await self.store.find_user(claims.username)  # Unavailable/Overloaded: never granted unchecked
        # No row, or another user's (deleted, its name registered again): counted as disabled.
        disabled = user is None or user.id != claims.sub or bool(user.disabled)
        return Identity(user_id=claims.sub, username=claims.username, admin=listed and not disabled, disabled=disabled)

    async def _require_admin(self, token: str) -> str:
        who = await self.identity(token)
        if not who.admin:
            raise Forbidden("auth: admin only (see admin_users / AIWFE_ADMIN_USERS)")
        return who.username

    @serves(WhoAmI, concurrency=4, max_queue=256, timeout_s=5.0)  # below the pool: logins keep connections
    async def whoami(self, req: WhoAmI) -> Identity:
        """The caller's identity: user id, name, admin, disabled (never cached).

        Raises:
            InvalidToken; Unavailable or Overloaded for an admin's token while its row cannot be read.
        """
        return await self.identity(req.token)

    async def _cut_off(self, sub: str) -> None:
        """Revoke every token of ``sub`` issued so far: Redis, this pod, every pod."""
        before = int(time.time())
        ttl_s = int(self.config.access_ttl_s + self.config.leeway_s) + 1
        exp = before + ttl_s
        self.subjects.add(sub, before, exp)
        if not await self.cache.revoke_subject(sub, before, ttl_s):
            log.warning("auth: redis unavailable; revocation of user %s held by the SubjectRevoked event only", sub)
        await self.kernel.publish(SubjectRevoked(sub=sub, before=before, exp=exp))

    @serves(DisableUser, concurrency=8, max_queue=64, timeout_s=10.0)
    async def disable_user(self, req: DisableUser) -> UserUpdated:
        """Disable (or enable) a user; disabling revokes its tokens.

        Raises:
            InvalidToken, Forbidden, UnknownUser, Overloaded, Unavailable.
        """
        admin = await self._require_admin(req.token)
        row = await self.store.set_disabled(req.username, req.disabled)
        if row is None:
            raise UnknownUser(f"no user {req.username!r}")
        if req.disabled:
            await self._cut_off(row[0])
        log.info("auth: %s %s user %s", admin, "disabled" if req.disabled else "enabled", row[1])
        return UserUpdated(user_id=row[0], username=row[1], disabled=req.disabled)

    @serves(DeleteUser, concurrency=8, max_queue=64, timeout_s=10.0)
    async def delete_user(self, req: DeleteUser) -> UserUpdated:
        """Delete a user and revoke its tokens.

        Raises:
            InvalidToken, Forbidden, UnknownUser, Overloaded, Unavailable.
        """
        admin = await self._require_admin(req.token)
        row = await self.store.delete_user(req.username)
        if row is None:
            raise UnknownUser(f"no user {req.username!r}")
        await self._cut_off(row[0])
        log.info("auth: %s deleted user %s", admin, row[1])
        return UserUpdated(user_id=row[0], username=row[1], deleted=True)

    @serves(SubjectRevoked, concurrency=8, max_queue=100_000)
    async def on_subject_revoked(self, ev: SubjectRevoked) -> None:
        """Another pod (or this one) cut off a user's tokens: deny them here too."""
        self.subjects.add(ev.sub, ev.before, ev.exp)
