"""What goes over the gateway's wire: WebSocket frames, close codes, terminal job events.

Frames of ``GET /v1/ws`` are JSON text frames, ``type`` is the tag. Client → server:
:class:`Submit`, :class:`Cancel`, :class:`Resume`, :class:`Ping`, :class:`Call`.
Server → client: ``accepted``, ``event``, ``result``, ``reply``, ``error`` and ``pong``
(built as dicts in :mod:`aiwfe.plugins.gateway.commands`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from .limits import MAX_SEQ

__all__ = [
    "CLOSE_BAD_DATA",
    "CLOSE_ERROR",
    "CLOSE_GOING_AWAY",
    "CLOSE_IDLE",
    "CLOSE_POLICY",
    "CLOSE_REVOKED",
    "CLOSE_SLOW",
    "CLOSE_TOO_BIG",
    "TERMINAL",
    "Call",
    "Cancel",
    "ClientFrame",
    "Ping",
    "Resume",
    "Submit",
    "decode_frame",
]

# WebSocket close codes the gateway sends.
CLOSE_IDLE = 1000  # no client frame for idle_timeout_s
CLOSE_GOING_AWAY = 1001  # the gateway stops
CLOSE_BAD_DATA = 1007  # a text frame that is not UTF-8
CLOSE_POLICY = 1008  # refused handshake (before accept) or rate limit exceeded
CLOSE_TOO_BIG = 1009  # frame larger than max_frame_bytes
CLOSE_ERROR = 1011  # the gateway failed handling a frame (a bug: logged)
CLOSE_SLOW = 1013  # send queue full: the client reads too slowly (reconnect and resume)
CLOSE_REVOKED = 4001  # token revoked or expired

#: Terminal job event type → the job's final status (WebSocket ``result`` frames, SSE).
TERMINAL = {"job.done": "done", "job.failed": "failed", "job.cancelled": "cancelled"}


class _Frame(msgspec.Struct, kw_only=True, tag_field="type"):
    pass


class Submit(_Frame, tag="submit"):
    """Submit a job of ``kind`` (a key of the gateway's ``job_kinds``) with JSON ``input``."""

    kind: str
    input: dict[str, Any] = {}
    id: str = ""
    idempotency_key: str | None = None
    cancel_on_disconnect: bool = False


class Cancel(_Frame, tag="cancel"):
    """Cancel a job."""

    job_id: str
    id: str = ""


class Resume(_Frame, tag="resume"):
    """Follow a job's events after sequence ``after_seq`` (0 = from the start)."""

    job_id: str
    after_seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0
    id: str = ""


class Ping(_Frame, tag="ping"):
    """Application-level ping; answered with ``pong``."""

    id: str = ""


class Call(_Frame, tag="call"):
    """A synchronous call of a request contract the gateway allows (``ws_calls``).

    ``input`` stays raw JSON here: it is decoded once, straight into the contract (no
    intermediate dict), by the command that knows which contract it is."""

    contract: str
    input: msgspec.Raw = msgspec.Raw(b"{}")
    id: str = ""


ClientFrame = Submit | Cancel | Resume | Ping | Call

_decoder: msgspec.json.Decoder[ClientFrame] = msgspec.json.Decoder(ClientFrame)  # type: ignore[arg-type]


def decode_frame(data: str | bytes) -> ClientFrame:
    """Decode one client frame.

    Raises:
        msgspec.DecodeError, msgspec.ValidationError: not JSON, unknown ``type``, or bad fields
            (numbers out of range included, e.g. ``after_seq`` outside ``0..MAX_SEQ``).
    """
    try:
        return _decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("JSON nested too deeply") from None
