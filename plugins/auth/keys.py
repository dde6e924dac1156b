"""JWT key settings (``[[plugins.auth.jwt_keys]]``) and reading token material."""

from __future__ import annotations

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
