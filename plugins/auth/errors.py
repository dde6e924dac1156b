"""Errors the auth plugin raises; callers see the class name as ``RemoteError.type``.

Plain Exception subclasses on purpose: the kernel transmits the class name, message and
``retryable`` flag, so nothing here depends on the kernel.
"""

from __future__ import annotations

__all__ = ["InvalidCredentials", "InvalidInput", "InvalidToken", "TooManyAttempts", "UnknownUser", "UserExists"]


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


class TooManyAttempts(Exception):
    """Login refused: too many failed attempts for this username or client address (the
    gateway answers 429 with ``Retry-After``). Not retryable as such: ``retry_after_s`` says
    when the lock ends. Said the same way whether or not the user exists."""

    retryable = False

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnknownUser(Exception):
    """An admin operation named a user that does not exist (admins only ever see this)."""

    retryable = False
