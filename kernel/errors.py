"""Error types shared by the local and the remote call paths.

Every error a caller can see is an :class:`AiwfeError` with a ``code``, a ``retryable``
flag and, when the raiser knows it, ``retry_after_s``. On the wire an error travels in the
``Aiwfe-Error`` header as JSON ``{"type", "message", "retryable", "retry_after_s"?}`` and is rebuilt into the same class by
:func:`from_wire`, so a caller cannot tell whether the handler ran in-process.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

__all__ = [
    "AiwfeError", "BadInput", "BadMessage", "ConfigError", "DeadlineExceeded", "Forbidden", "Overloaded", "PeerLost",
    "RemoteError", "SchemaMismatch", "TooLarge", "Unavailable", "UndeclaredCall", "from_wire", "to_wire",
]  # fmt: skip


class AiwfeError(Exception):
    """Base class. ``retryable`` says whether the same call may succeed later;
    ``retry_after_s``, when the raiser knows, how soon (the gateway's ``Retry-After``)."""

    code: ClassVar[str] = "error"
    retryable: bool = False

    def __init__(self, message: str = "", *, retryable: bool | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        if retryable is not None:
            self.retryable = retryable


class DeadlineExceeded(AiwfeError):
    """The call's deadline passed before a reply arrived."""

    code = "deadline_exceeded"
    retryable = True


class Unavailable(AiwfeError):
    """Nobody serves the subject (no plugin in this pod, no responder on NATS)."""

    code = "unavailable"
    retryable = True


class PeerLost(Unavailable):
    """The pod serving a call went silent mid-call: no reply and no liveness heartbeat within
    the liveness window (it died, lost its connection, or stopped). Whether the handler ran
    is unknown, so only an idempotent contract is retried by the kernel (once); retry others
    only where running them twice is harmless."""

    code = "peer_lost"


class Overloaded(AiwfeError):
    """The handler is at its concurrency limit and its queue is full. Retry later."""

    code = "overloaded"
    retryable = True


class SchemaMismatch(AiwfeError):
    """Caller and server disagree on the contract's schema (different versions)."""

    code = "schema_mismatch"


class Forbidden(AiwfeError):
    """The caller may not touch this resource (e.g. another user's job)."""

    code = "forbidden"


class BadMessage(AiwfeError):
    """The payload could not be decoded as the contract."""

    code = "bad_message"


class BadInput(BadMessage):
    """Input refused where it entered (a job's input does not fit its contract); names the field."""

    code = "bad_input"


class TooLarge(AiwfeError):
    """The message is larger than the bus (NATS ``max_payload``) or the entry point accepts."""

    code = "too_large"


class UndeclaredCall(AiwfeError):
    """A plugin called a contract it did not list in ``calls``."""

    code = "undeclared_call"


class ConfigError(AiwfeError):
    """A manifest or plugin configuration problem."""

    code = "config_error"


class RemoteError(AiwfeError):
    """The handler raised. ``type`` is the name of the exception class it raised.

    ``declared`` is True when that exception class declared ``retryable`` itself; a job
    whose handler raises an error declared not retryable is dead-lettered at once
    instead of being retried up to ``max_deliver``.
    """

    code = "remote_error"

    def __init__(
        self, type: str, message: str, *, retryable: bool = False, declared: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after_s=retry_after_s)
        self.type = type
        self.declared = declared

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


_WIRE = (
    DeadlineExceeded, Unavailable, PeerLost, Overloaded, SchemaMismatch, BadMessage, BadInput, TooLarge, UndeclaredCall,
    Forbidden,
)  # fmt: skip
_KNOWN: dict[str, type[AiwfeError]] = {cls.__name__: cls for cls in _WIRE}


class _WireError(msgspec.Struct, frozen=True, omit_defaults=True):
    type: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None  # omitted when unknown; older readers ignore it


def to_wire(exc: BaseException) -> bytes:
    """Encode ``exc`` for the ``Aiwfe-Error`` header. Non-kernel errors become RemoteError."""
    hint = getattr(exc, "retry_after_s", None)
    if isinstance(exc, RemoteError):
        w = _WireError(exc.type, exc.message, exc.retryable, hint)
    elif type(exc).__name__ in _KNOWN and isinstance(exc, AiwfeError):
        w = _WireError(type(exc).__name__, exc.message, exc.retryable, hint)
    else:
        w = _WireError(type(exc).__name__, str(exc), bool(getattr(exc, "retryable", False)), hint)
    return msgspec.json.encode(w)


def as_remote(exc: BaseException) -> AiwfeError:
    """Map an exception raised by a handler to what a caller sees (same for both paths)."""
    if type(exc).__name__ in _KNOWN and isinstance(exc, AiwfeError):
        return exc
    if isinstance(exc, RemoteError):
        return exc
    declared = getattr(exc, "retryable", None)
    hint = getattr(exc, "retry_after_s", None)
    return RemoteError(type(exc).__name__, str(exc), retryable=bool(declared), declared=declared is not None, retry_after_s=hint)


def from_wire(raw: str | bytes) -> AiwfeError:
    """Rebuild the caller-side error from an ``Aiwfe-Error`` header value."""
    try:
        w = msgspec.json.decode(raw, type=_WireError)
    except msgspec.DecodeError:
        return RemoteError("UnknownError", str(raw))
    known = _KNOWN.get(w.type)
    if known is not None:
        return known(w.message, retryable=w.retryable, retry_after_s=w.retry_after_s)
    return RemoteError(w.type, w.message, retryable=w.retryable, retry_after_s=w.retry_after_s)
