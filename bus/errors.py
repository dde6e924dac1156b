"""Transport failures. The bus raises only these; the kernel maps them to its own error
types (a timeout to ``DeadlineExceeded``, a lost callee to ``PeerLost``, the rest to ``Unavailable``)."""

from __future__ import annotations

__all__ = ["BusError", "BusTimeout", "CalleeLost", "NoResponders", "NotAccepted", "NotConnected", "PayloadTooLarge"]


class BusError(Exception):
    """A transport failure (the server is unreachable, refused or did not answer)."""


class NotConnected(BusError):
    """No connection to the server (not yet connected, closed, or none within the limit)."""


class NoResponders(BusError):
    """Nobody subscribes to the request's subject."""


class BusTimeout(BusError):
    """No reply within the time given."""


class CalleeLost(BusError):
    """The request was taken but its callee went silent: neither a reply nor a liveness
    heartbeat within the liveness window (:mod:`aiwfe.bus.nats`, "Liveness of calls")."""


class NotAccepted(BusError):
    """The server did not acknowledge a durable write (stream publish, KV write).

    ``uncertain``: no answer came (a timeout, a connection lost after the publish went out),
    so the write may have been stored; False when the server refused it (nothing stored).
    """

    def __init__(self, message: str = "", *, uncertain: bool = False) -> None:
        super().__init__(message)
        self.uncertain = uncertain


class PayloadTooLarge(NotAccepted):
    """The message (payload and headers) is larger than the server accepts (``max_payload``);
    sending it would make the server close the connection, so it is refused before it is sent."""
