"""JWT issue and verification (PyJWT), with key ids and rotation. Pure: no I/O.

One key signs; every key in the ring verifies (the signing key, plus older keys kept
for rotation). Each key is pinned to one algorithm, and a token's ``kid`` picks the key,
so a token can never choose how it is checked: ``alg: none``, an algorithm other than
its key's, an unknown ``kid`` and key confusion (an HS256 token "signed" with an RSA
public key as the secret) are all rejected before any signature check.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .contract import Claims
from .errors import InvalidToken

__all__ = ["ALGORITHMS", "MAX_TOKEN_CHARS", "KeyRing", "TokenService", "VerifyingKey", "token_digest"]

#: Algorithms we issue and accept. Anything else (``none`` included) is refused.
ALGORITHMS = frozenset({"HS256", "RS256", "ES256", "EdDSA"})

#: Shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash output size).
MIN_SECRET_BYTES = 32

_REQUIRED = ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]

#: Longest token looked at; ours are ~300-700 characters. Bounds the work a junk token costs.
MAX_TOKEN_CHARS = 8192


def token_digest(token: str) -> str:
    """SHA-256 hex digest of a token: its cache key (stable across processes, unlike ``hash()``)."""
    return hashlib.sha256(token.encode()).hexdigest()


class VerifyingKey(msgspec.Struct, frozen=True):
    """One key of the ring: its id, its one algorithm, the key object PyJWT checks with."""

    kid: str
    algorithm: str
    key: Any


def _load_private(algorithm: str, material: str) -> tuple[Any, Any]:
    """(signing key, verifying key) for ``algorithm`` from a secret or a PEM private key.

    Raises:
        ValueError: unknown algorithm, short secret, or a PEM key of the wrong type.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {sorted(ALGORITHMS)}")
    if algorithm == "HS256":
        secret = material.encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        return secret, secret
    priv = serialization.load_pem_private_key(material.encode(), password=None)
    _check_type(algorithm, priv.public_key())
    return priv, priv.public_key()


def _load_public(algorithm: str, material: str) -> Any:
    """The verifying key for ``algorithm`` from a secret or a PEM public (or private) key.

    Raises:
        ValueError: unknown algorithm, short secret, or a PEM key of the wrong type.
    """
    if algorithm == "HS256":
        return _load_private(algorithm, material)[1]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is not one of {sorted(ALGORITHMS)}")
    if "PRIVATE KEY" in material:
        return _load_private(algorithm, material)[1]
    pub = serialization.load_pem_public_key(material.encode())
    _check_type(algorithm, pub)
    return pub


def _check_type(algorithm: str, pub: Any) -> None:
    want = {"RS256": rsa.RSAPublicKey, "ES256": ec.EllipticCurvePublicKey, "EdDSA": ed25519.Ed25519PublicKey}[algorithm]
    if not isinstance(pub, want):
        raise ValueError(f"{algorithm} needs a {want.__name__}, got {type(pub).__name__}")
    if algorithm == "ES256" and not isinstance(pub.curve, ec.SECP256R1):  # type: ignore[attr-defined]
        raise ValueError("ES256 needs a P-256 key")


class KeyRing:
    """The signing key and every verifying key, by ``kid``.

    Args:
        signing_kid: id stamped in the header of every token we issue.
        algorithm: the signing key's algorithm (one of :data:`ALGORITHMS`).
        signing_material: the HS256 secret, or a PEM private key for the others.
        verify_only: older keys still accepted: ``(kid, algorithm, secret or PEM)``.

    Raises:
        ValueError: a bad algorithm, key or duplicate ``kid``.
    """

    def __init__(
        self, signing_kid: str, algorithm: str, signing_material: str, verify_only: list[tuple[str, str, str]] | None = None
    ) -> None:
        if not signing_kid:
            raise ValueError("the signing key needs a non-empty kid")
        self.signing_kid = signing_kid
        self.algorithm = algorithm
        self.signing_key, pub = _load_private(algorithm, signing_material)
        self.keys: dict[str, VerifyingKey] = {signing_kid: VerifyingKey(signing_kid, algorithm, pub)}
        for kid, alg, material in verify_only or []:
            if kid in self.keys:
                raise ValueError(f"duplicate key id {kid!r}")
            self.keys[kid] = VerifyingKey(kid, alg, _load_public(alg, material))


class TokenService:
    """Issues and verifies access tokens.

    Args:
        ring: the keys.
        issuer: ``iss`` stamped and required.
        audience: ``aud`` stamped and required.
        access_ttl_s: lifetime of an issued token.
        leeway_s: clock skew tolerated on ``exp``/``nbf``/``iat``.
    """

    def __init__(self, ring: KeyRing, *, issuer: str, audience: str, access_ttl_s: int, leeway_s: float = 10.0) -> None:
        self.ring = ring
        self.issuer = issuer
        self.audience = audience
        self.access_ttl_s = access_ttl_s
        self.leeway_s = leeway_s

    def issue(
        self, user_id: str, username: str, scopes: list[str] | None = None, *, now: float | None = None
    ) -> tuple[str, Claims]:
        """Sign a new access token; return it with its claims."""
        iat = int(time.time() if now is None else now)
        claims = Claims(
            sub=user_id, username=username, jti=uuid.uuid4().hex, exp=iat + self.access_ttl_s, iat=iat, scopes=list(scopes or [])
        )
        payload = {
            "sub": claims.sub,
            "username": claims.username,
            "jti": claims.jti,
            "iat": iat,
            "nbf": iat,
            "exp": claims.exp,
            "iss": self.issuer,
            "aud": self.audience,
            "scopes": claims.scopes,
        }
        token = jwt.encode(payload, self.ring.signing_key, algorithm=self.ring.algorithm, headers={"kid": self.ring.signing_kid})
        return token, claims

    def key_for(self, token: str) -> VerifyingKey:
        """The ring key that must have signed ``token`` (from its header alone).

        Raises:
            InvalidToken: missing/garbled token, ``alg`` not allowed, unknown or missing ``kid``,
                or an ``alg`` that differs from the key's (key confusion).
        """
        if not token:
            raise InvalidToken("missing", "malformed: no token")
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("malformed", f"malformed: longer than {MAX_TOKEN_CHARS} characters")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as e:
            raise InvalidToken("malformed", f"malformed: {e}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise InvalidToken("algorithm", f"algorithm not allowed: {alg!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("unknown_kid", "unknown key: the token names no key id (kid)")
        key = self.ring.keys.get(kid)
        if key is None:
            raise InvalidToken("unknown_kid", f"unknown key: kid {kid!r} is not one of ours")
        if alg != key.algorithm:
            raise InvalidToken("algorithm", f"algorithm not allowed: key {kid!r} is {key.algorithm}, the token says {alg}")
        return key

    def verify(self, token: str) -> Claims:
        """Check a token's header, signature and registered claims; return its claims.

        Revocation is not checked here (the plugin does that).

        Raises:
            InvalidToken: with the reason (see :class:`~plugins.auth.errors.InvalidToken`).
        """
        key = self.key_for(token)
        try:
            payload = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": _REQUIRED},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("expired", "expired: the token's exp has passed") from None
        except jwt.ImmatureSignatureError as e:
            raise InvalidToken("not_yet_valid", f"not yet valid: {e}") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("audience", f"wrong audience: expected {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("issuer", f"wrong issuer: expected {self.issuer!r}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad_signature", "bad signature") from None
        except jwt.InvalidAlgorithmError as e:
            raise InvalidToken("algorithm", f"algorithm not allowed: {e}") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken("malformed", f"malformed: {e}") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise InvalidToken("malformed", f"malformed: {e}") from None
        try:
            return msgspec.convert(
                {
                    "sub": payload["sub"],
                    "username": payload.get("username", ""),
                    "jti": payload["jti"],
                    "exp": payload["exp"],
                    "iat": payload["iat"],
                    "scopes": payload.get("scopes", []),
                },
                Claims,
            )
        except msgspec.ValidationError as e:
            raise InvalidToken("malformed", f"malformed: {e}") from None
