"""Contracts of the auth plugin (msgspec and stdlib only).

Errors a caller can see (``RemoteError.type``): ``InvalidCredentials`` (login),
``UserExists`` (register), ``InvalidInput`` (register: bad username/password),
``InvalidToken`` (verify/logout; the message says why: expired, bad signature,
algorithm not allowed, unknown key, wrong audience, wrong issuer, not yet valid, revoked,
malformed), ``TooManyAttempts`` (login: throttled, with ``retry_after_s``), ``Forbidden``
(admin operations by a non-admin), ``UnknownUser`` (admin operations). Pool exhaustion
surfaces as ``Overloaded`` (retryable).
"""

from __future__ import annotations

from aiwfe.kernel.contract import Event, Reply, Request

__all__ = [
    "Claims",
    "DeleteUser",
    "DisableUser",
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
