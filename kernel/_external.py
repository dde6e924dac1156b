"""What the subjects for external clients share: JSON or msgpack bodies, error replies."""

from __future__ import annotations

from typing import Any

import msgspec

from aiwfe.bus.base import Headers
from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, JSON

from .errors import AiwfeError, to_wire

#: The owner entry of a job submitted on a submit subject (no gateway user is called that).
SUBMITTED = "~submit"
_JSON_HEADERS = {H_CONTENT_TYPE: JSON}
_enc = msgspec.msgpack.Encoder()
_json = msgspec.json.Encoder()


def is_json(data: bytes, headers: Headers | None) -> bool:
    """True for a JSON body: ``Content-Type: application/json``, or no content type and a
    body starting with ``{`` (never the start of a msgpack map)."""
    ct = headers.get(H_CONTENT_TYPE) if headers else None
    if ct is not None:
        return ct.split(";", 1)[0].strip().lower() == JSON
    return data[:1] == b"{"


def reply(value: Any, as_json: bool) -> tuple[bytes, Headers | None]:
    """A reply body in the request's encoding (JSON replies say so in ``Content-Type``)."""
    return (_json.encode(value), dict(_JSON_HEADERS)) if as_json else (_enc.encode(value), None)


def error_reply(e: AiwfeError) -> tuple[bytes, Headers]:
    """An error reply: empty body, the ``Aiwfe-Error`` header."""
    return b"", {H_ERROR: to_wire(e).decode()}
