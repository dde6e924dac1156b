"""JWT key settings (``[[plugins.auth.jwt_keys]]``) and reading token material."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec

from aiwfe.kernel.errors import ConfigError

__all__ = ["JwtKey"]


class JwtKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A verification-only key kept for rotation: tokens signed with it still verify.

    ``key`` is the HS256 secret or a PEM public key; ``key_file`` reads it from a file.
    """

    kid: str
    algorithm: str = "HS256"
    key: str = ""
    key_file: str = ""


def _material(value: str, path: str, what: str) -> str:
    if value:
        return value
    if path:
        try:
            return Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"auth: cannot read {what} from {path}: {e}") from None
    return ""


def _unverified_jti(token: str) -> str | None:
    """The ``jti`` in a token's payload, read WITHOUT verification (a cache lookup hint only)."""
    try:
        payload = token.split(".")[1]
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        jti = msgspec.json.decode(raw).get("jti")
    except (IndexError, ValueError, AttributeError, msgspec.DecodeError):
        return None
    return jti if isinstance(jti, str) else None
