"""Contracts of the auth plugin (msgspec and stdlib only).

Errors a caller can see (``RemoteError.type``): ``InvalidCredentials`` (login),
``UserExists`` (register), ``InvalidInput`` (register: bad username/password),
``InvalidToken`` (verify/logout; the message says why: expired, bad signature,
algorithm not allowed, unknown key, wrong audience, wrong issuer, not yet valid, revoked,
malformed), ``TooManyAttempts`` (login: throttled, with ``retry_after_s``), ``Forbidden``
(admin operations by a non-admin), ``UnknownUser`` (admin operations). Pool exhaustion
surfaces as ``Overloaded`` (retryable); ``auth.whoami`` of an admin while the database is
down as ``Unavailable`` (retryable).
"""

from __future__ import annotations

from aiwfe.kernel.contract import Event, Reply, Request

__all__ = [
    "Claims",
    "DeleteUser",
    "DisableUser",
    "Identity",
    "LoggedOut",
    "Login",
    "Logout",
    "Register",
    "Registered",
    "SubjectRevoked",
    "Token",
    "TokenRevoked",
    "UserUpdated",
    "Verify",
    "WhoAmI",
]


class Registered(Reply):
    user_id: str
    username: str


class Register(Request[Registered], tag="auth.register"):
    """Create a user. Usernames: 3 to 64 chars of ``[A-Za-z0-9_.@-]``; passwords: 8 to 256 chars."""

    username: str
    password: str


class Token(Reply):
    """What ``POST /v1/auth/login`` returns."""

    access_token: str
    token_type: str = "bearer"
    expires_in: int = 0


class Login(Request[Token], tag="auth.login"):
    """``client``: the caller's address as the gateway saw it (throttling key; empty: none)."""

    username: str
    password: str
    client: str = ""


class Claims(Reply):
    """The verified claims of a token."""

    sub: str
    username: str
    jti: str
    exp: int
    iat: int = 0
    scopes: list[str] = []


class Verify(Request[Claims], tag="auth.verify"):
    token: str


class LoggedOut(Reply):
    jti: str


class Logout(Request[LoggedOut], tag="auth.logout"):
    """Revoke ``token`` (by its ``jti``) until it would have expired."""

    token: str


class TokenRevoked(Event, tag="auth.revoked"):
    """Broadcast on logout: every pod that verifies tokens adds ``jti`` to its denylist
    until ``exp``; the gateway closes that token's WebSockets with 4001."""

    jti: str
    exp: int


class UserUpdated(Reply):
    """What an admin operation did to a user."""

    user_id: str
    username: str
    disabled: bool = False
    deleted: bool = False


class DisableUser(Request[UserUpdated], tag="auth.disable_user"):
    """Admin (``token`` is an admin's): disable ``username`` (``disabled=False`` enables it
    again). Disabling revokes every token of the user issued so far (:class:`SubjectRevoked`)."""

    token: str
    username: str
    disabled: bool = True


class DeleteUser(Request[UserUpdated], tag="auth.delete_user"):
    """Admin (``token`` is an admin's): delete ``username`` and revoke all its tokens."""

    token: str
    username: str


class SubjectRevoked(Event, tag="auth.subject_revoked"):
    """Broadcast when a user is disabled or deleted: every pod denies tokens of ``sub`` issued
    at or before ``before`` (epoch seconds) until ``exp``; the gateway closes that user's
    WebSockets with 4001."""

    sub: str
    before: int
    exp: int


class Identity(Reply):
    """Who a token's user is now: ``admin`` is True only for an enabled user named in the
    auth plugin's admin list; ``disabled`` is True for a listed user the database marks
    disabled or no longer holds (a token that outlived its user's cut-off). Only listed users'
    rows are read; anyone else is answered from the verified token (``disabled`` False: a
    disabled user's tokens are refused by its cut-off)."""

    user_id: str
    username: str
    admin: bool = False
    disabled: bool = False


class WhoAmI(Request[Identity], tag="auth.whoami"):
    """The caller's identity and whether it is an admin, decided by the auth plugin at each
    call (never cached): the token is verified (revocation included), then the user's row
    is read. Raises ``InvalidToken``; ``Unavailable`` only for an admin's token while the
    database is down (admin rights are never granted unchecked; a non-admin is answered
    from the token alone)."""

    token: str
