"""A test-only stand-in for the auth plugin: same contracts, HS256 tokens, users in memory.

Used by the gateway's unit tests (LocalBus, no database). It checks what a real verifier
checks: signature, algorithm (HS256 only, so ``alg: none`` fails), expiry, audience,
issuer, and revocation; every failure is ``InvalidToken`` with the reason.
"""

from __future__ import annotations

import time
import uuid

import jwt
import msgspec

from aiwfe.kernel import Plugin, serves
from aiwfe.plugins.auth.contract import Claims, LoggedOut, Login, Logout, Register, Registered, Token, TokenRevoked, Verify

__all__ = ["AUDIENCE", "ISSUER", "SECRET", "AuthDoublePlugin", "InvalidCredentials", "InvalidToken", "UserExists", "make_token"]

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
AUDIENCE = "aiwfe"
ISSUER = "aiwfe-auth"


class InvalidToken(Exception):
    retryable = False


class InvalidCredentials(Exception):
    retryable = False


class UserExists(Exception):
    retryable = False


def make_token(
    sub: str = "u1",
    *,
    username: str = "alice",
    ttl_s: float = 900,
    secret: str = SECRET,
    audience: str = AUDIENCE,
    algorithm: str = "HS256",
    jti: str | None = None,
) -> str:
    """Sign a token the way the double does (tests forge bad ones with other arguments)."""
    now = int(time.time())
    payload = {
        "sub": sub,
        "username": username,
        "jti": jti or uuid.uuid4().hex,
        "iat": now,
        "exp": int(now + ttl_s),
        "aud": audience,
        "iss": ISSUER,
    }
    return jwt.encode(payload, secret if algorithm != "none" else None, algorithm=algorithm)  # type: ignore[arg-type]


class AuthDoublePlugin(Plugin):
    """Serves auth.register/login/verify/logout and publishes auth.revoked."""

    name = "auth"
    calls = (TokenRevoked,)

    class Config(msgspec.Struct, frozen=True):
        token_ttl_s: int = 900

    def __init__(self, config: msgspec.Struct, kernel: object) -> None:
        super().__init__(config, kernel)  # type: ignore[arg-type]
        self.users: dict[str, tuple[str, str]] = {}
        self.revoked: set[str] = set()
        self.verifies = 0

    @serves(Register)
    async def register(self, req: Register) -> Registered:
        if req.username in self.users:
            raise UserExists(f"user {req.username} exists")
        uid = uuid.uuid4().hex
        self.users[req.username] = (uid, req.password)
        return Registered(user_id=uid, username=req.username)

    @serves(Login)
    async def login(self, req: Login) -> Token:
        u = self.users.get(req.username)
        if u is None or u[1] != req.password:
            raise InvalidCredentials("wrong username or password")
        ttl = self.config.token_ttl_s  # type: ignore[attr-defined]
        return Token(access_token=make_token(u[0], username=req.username, ttl_s=ttl), expires_in=ttl)

    def _decode(self, token: str) -> Claims:
        try:
            p = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        if p["jti"] in self.revoked:
            raise InvalidToken("revoked")
        return Claims(sub=p["sub"], username=p["username"], jti=p["jti"], exp=p["exp"], iat=p["iat"])

    @serves(Verify, concurrency=256, max_queue=100_000)
    async def verify(self, req: Verify) -> Claims:
        self.verifies += 1
        return self._decode(req.token)

    @serves(Logout)
    async def logout(self, req: Logout) -> LoggedOut:
        c = self._decode(req.token)
        self.revoked.add(c.jti)
        await self.kernel.publish(TokenRevoked(jti=c.jti, exp=c.exp))
        return LoggedOut(jti=c.jti)
