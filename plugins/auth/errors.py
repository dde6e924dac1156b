"""Errors the auth plugin raises; callers see the class name as ``RemoteError.type``.

Plain Exception subclasses on purpose: the kernel transmits the class name, message and
``retryable`` flag, so nothing here depends on the kernel.
"""

from __future__ import annotations

__all__ = ["InvalidCredentials", "InvalidInput", "InvalidToken", "UserExists"]


class InvalidToken(Exception):
    """A token failed verification. ``reason`` is a short label (also a metric label):
    ``missing``, ``malformed``, ``algorithm``, ``unknown_kid``, ``bad_signature``, ``expired``,
    ``not_yet_valid``, ``audience``, ``issuer``, ``revoked``. The message says why in words."""

    retryable = False

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidCredentials(Exception):
    """Login failed: unknown user or wrong password (deliberately indistinguishable)."""

    retryable = False


class UserExists(Exception):
    """Register: the username is taken (case-insensitively)."""

    retryable = False


class InvalidInput(Exception):
    """Register: the username or password does not meet the rules in the contract."""

    retryable = False
