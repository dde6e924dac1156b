"""JWT issue and verification, with key ids and rotation. Pure: no I/O.

One key signs; every key in the ring verifies (the signing key, plus older keys kept
for rotation). Each key is pinned to one algorithm, and a token's ``kid`` picks the key,
so a token can never choose how it is checked: ``alg: none``, an algorithm other than
its key's, an unknown ``kid`` and key confusion (an HS256 token "signed" with an RSA
public key as the secret) are all rejected before any signature check.

Issuing uses PyJWT. Verifying parses the compact form itself (strict, canonical
base64url; JSON with msgspec; any ``crit`` or ``b64`` header refused) and checks the
signature with ``hmac`` (HS256) or PyJWT's algorithm objects (RS256, ES256, EdDSA), then
the registered claims in PyJWT's order with PyJWT's rules (required claims; ``iat``,
``nbf``, ``exp`` with leeway; ``iss`` equal; ``aud`` a string or list holding ours),
except that NumericDates must be JSON numbers (PyJWT also takes digit strings) and that
padded segments are refused (PyJWT accepts a trailing ``=`` for AWS ALB's tokens).
``jwt.decode`` spent ≈ 60 µs per token, most of it in a per-character base64 check, and
parsed the header twice; this path takes ≈ 16 µs for HS256, which matters when 2,000
WebSocket handshakes arrive in a second. ``tests/unit/test_auth_tokens.py`` checks it
against ``jwt.decode`` on generated and mutated tokens.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import time
import uuid
from typing import Any

import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

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

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_TO_STD_B64 = str.maketrans("-_", "+/")
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: Per base64url character, its bits that a segment's last character must leave clear, by
#: segment length mod 4 (2: the last 4 bits are padding; 3: the last 2): set → not canonical.
_PAD_BITS = {2: {c: i & 0x0F for i, c in enumerate(_B64URL)}, 3: {c: i & 0x03 for i, c in enumerate(_B64URL)}}
_json = msgspec.json.Decoder()
_ALGORITHM_OBJECTS = get_default_algorithms()


def _b64url(segment: str, what: str) -> bytes:
    """Decode one strict, canonical, unpadded base64url segment (RFC 7515 §2).

    Raises:
        InvalidToken: ``malformed``.
    """
    if len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
        raise InvalidToken("malformed", f"malformed: invalid base64url in the {what}")
    try:
        data = binascii.a2b_base64(segment.translate(_TO_STD_B64) + "=" * (-len(segment) % 4), strict_mode=True)
    except binascii.Error:
        raise InvalidToken("malformed", f"malformed: invalid base64url in the {what}") from None
    pad = _PAD_BITS.get(len(segment) % 4)
    if pad is not None and pad[segment[-1]]:  # unused bits set: not canonical (re-encoding cost 3x more)
        raise InvalidToken("malformed", f"malformed: invalid base64url in the {what}")
    return data


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = _json.decode(data)
    except (msgspec.DecodeError, RecursionError) as e:  # nesting ~1,000 deep fits in a token: msgspec's depth limit
        raise InvalidToken("malformed", f"malformed: invalid {what} JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidToken("malformed", f"malformed: the {what} must be a JSON object")
    return obj


def _numeric_date(payload: dict[str, Any], claim: str, name: str) -> float:
    value = payload[claim]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken("malformed", f"malformed: {name} claim ({claim}) must be a number")
    return float(int(value))


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
        return self._header(token)[0]

    def _header(self, token: str) -> tuple[VerifyingKey, list[str]]:
        """:meth:`key_for`, also returning the token's three segments."""
        if not token:
            raise InvalidToken("missing", "malformed: no token")
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("malformed", f"malformed: longer than {MAX_TOKEN_CHARS} characters")
        segments = token.split(".")
        if len(segments) != 3:
            raise InvalidToken("malformed", "malformed: a token has three segments")
        for segment, what in zip(segments[1:], ("payload", "signature"), strict=True):  # form only; decoded in verify
            if len(segment) % 4 == 1 or not _SEGMENT.fullmatch(segment):
                raise InvalidToken("malformed", f"malformed: invalid base64url in the {what}")
        header = _json_object(_b64url(segments[0], "header"), "header")
        if "crit" in header or "b64" in header:
            raise InvalidToken("malformed", "malformed: unsupported header parameter (crit, b64)")
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
        return key, segments

    def verify(self, token: str) -> Claims:
        """Check a token's header, signature and registered claims; return its claims.

        Revocation is not checked here (the plugin does that).

        Raises:
            InvalidToken: with the reason (see :class:`~plugins.auth.errors.InvalidToken`).
        """
        key, (h, p, sig) = self._header(token)
        signature = _b64url(sig, "signature")
        signing_input = f"{h}.{p}".encode("ascii")
        if key.algorithm == "HS256":
            good = hmac.compare_digest(hmac.new(key.key, signing_input, hashlib.sha256).digest(), signature)
        else:
            good = _ALGORITHM_OBJECTS[key.algorithm].verify(signing_input, key.key, signature)
        if not good:
            raise InvalidToken("bad_signature", "bad signature")
        payload = _json_object(_b64url(p, "payload"), "payload")
        for claim in _REQUIRED:
            if payload.get(claim) is None:
                raise InvalidToken("malformed", f'malformed: Token is missing the "{claim}" claim')
        now, leeway = time.time(), self.leeway_s
        if _numeric_date(payload, "iat", "Issued At") > now + leeway:
            raise InvalidToken("not_yet_valid", "not yet valid: The token is not yet valid (iat)")
        if _numeric_date(payload, "nbf", "Not Before") > now + leeway:
            raise InvalidToken("not_yet_valid", "not yet valid: The token is not yet valid (nbf)")
        if _numeric_date(payload, "exp", "Expiration Time") <= now - leeway:
            raise InvalidToken("expired", "expired: the token's exp has passed")
        if payload["iss"] != self.issuer:
            raise InvalidToken("issuer", f"wrong issuer: expected {self.issuer!r}")
        aud = payload["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences) or self.audience not in audiences:
            raise InvalidToken("audience", f"wrong audience: expected {self.audience!r}")
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
