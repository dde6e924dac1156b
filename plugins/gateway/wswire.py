"""The bytes of the gateway's WebSocket protocol (:mod:`~aiwfe.plugins.gateway.wsproto`):
server frames, close frames, HTTP answers in place of an upgrade, and the handshake check.

The handshake: ``GET`` in HTTP/1.1 (or later) with a ``Host`` header, ``Sec-WebSocket-Key``
the base64 of 16 bytes (and only one), else 400; ``Sec-WebSocket-Version`` 13, else 426
naming it. No extension is negotiated (a client offering permessage-deflate gets plain
frames, as RFC 6455 allows).

A client's close frame (:func:`parse_close`): empty, or a code a client may send (1000–1003,
1007–1014, 3000–4999) and a UTF-8 reason; else the connection fails with 1002 or 1007.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from typing import Any, cast
from urllib.parse import unquote

import httptools

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "ProtocolError",
    "Refusal",
    "apply_mask",
    "close_frame",
    "frame_bytes",
    "handshake",
    "http_response",
    "json_answer",
    "parse_close",
    "switching_response",
]

#: An HTTP answer in place of the upgrade: status, body, extra headers.
Refusal = tuple[int, bytes, list[tuple[bytes, bytes]]]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_PHRASES = {400: b"Bad Request", 403: b"Forbidden", 426: b"Upgrade Required", 431: b"Request Header Fields Too Large"}
_PHRASES |= {408: b"Request Timeout", 500: b"Internal Server Error"}
#: Close codes a client may send (RFC 6455 7.4; 1012–1014 registered with IANA since).
_CLIENT_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))


class ProtocolError(Exception):
    """A frame that fails the connection: ``code`` is the close code to send."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a client's close frame (1005 and "" when it holds none).

    Raises:
        ProtocolError: a 1-byte payload or a code no endpoint may send (1002), a reason
            that is not UTF-8 (1007).
    """
    if not payload:
        return 1005, ""
    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 0
    if code not in _CLIENT_CODES:
        raise ProtocolError(1002, f"invalid close code {code}" if code else "close frame of one byte")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not UTF-8") from None


def frame_bytes(first: int, payload: bytes) -> bytes:
    """One unmasked (server) frame: ``first`` is the FIN bit and opcode byte (0x81 text)."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def close_frame(code: int | None, reason: str = "") -> bytes:
    """A close frame with ``code`` (None: no code) and ``reason`` cut to fit 125 bytes."""
    if code is None:
        return b"\x88\x00"
    text = reason.encode()[:123].decode(errors="ignore").encode()  # a control frame holds ≤ 125 bytes
    return frame_bytes(0x88, code.to_bytes(2, "big") + text)


def http_response(status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection (plain text unless ``headers`` say)."""
    phrase = _PHRASES.get(status, b"")
    lines = [b"HTTP/1.1 %d %s" % (status, phrase)]
    names = {k.lower() for k, _ in headers}
    lines += [k + b": " + v for k, v in headers]
    if b"content-type" not in names:
        lines.append(b"content-type: text/plain; charset=utf-8")
    if b"content-length" not in names:
        lines.append(b"content-length: %d" % len(body))
    lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def json_answer(status: int, detail: str) -> bytes:
    """An answer in the gateway's error shape (Litestar's ``{"status_code", "detail"}``) that
    closes the connection."""
    body = json.dumps({"status_code": status, "detail": detail}).encode()
    return http_response(status, [(b"content-type", b"application/json")], body)


def switching_response(accept: bytes, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The 101 answer completing a handshake (``accept``: the ``Sec-WebSocket-Accept`` value).

    Raises:
        RuntimeError: a header name or value holds a line break.
    """
    lines = [b"HTTP/1.1 101 Switching Protocols", b"upgrade: websocket", b"connection: Upgrade"]
    lines.append(b"sec-websocket-accept: " + accept)
    if subprotocol:
        lines.append(b"sec-websocket-protocol: " + subprotocol.encode())
    for name, value in headers:
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name:
            raise RuntimeError("a header of websocket.accept holds a line break")
        lines.append(name + b": " + value)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def handshake(http: dict[str, Any], url: bytes, root: str) -> tuple[dict[str, Any], bytes, Refusal | None]:
    """The ASGI scope of an upgrade request httptools parsed (``http``: uvicorn's HTTP scope,
    ``url`` the request target), the ``Sec-WebSocket-Accept`` value, and the refusal
    (status, body, headers) when the request is no valid handshake (see the module doc)."""
    headers: list[tuple[bytes, bytes]] = http["headers"]
    key = version = None
    host = False
    accept, refusal = b"", cast(Refusal | None, None)
    protocols: list[str] = []
    for name, value in headers:
        if name == b"sec-websocket-key":
            key = value if key is None else b""  # two keys: invalid
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"sec-websocket-protocol":
            protocols += [p.strip() for p in value.decode("latin-1").split(",")]
        elif name == b"host":
            host = True
    try:
        valid_key = key is not None and len(base64.b64decode(key, validate=True)) == 16
        parsed = httptools.parse_url(url)
    except (binascii.Error, httptools.HttpParserInvalidURLError):
        valid_key, parsed = False, None
    if http.get("method") != "GET" or not valid_key or parsed is None or not host or http.get("http_version", "1.1") < "1.1":
        refusal = (400, b"invalid WebSocket handshake\n", [])
    elif version != b"13":
        refusal = (426, b"unsupported WebSocket version\n", [(b"sec-websocket-version", b"13")])
    else:
        assert key is not None
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    raw_path = parsed.path if parsed is not None else b"/"
    path = raw_path.decode("latin-1")
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "server": http.get("server"),
        "client": http.get("client"),
        "root_path": root,
        "path": root + (unquote(path) if "%" in path else path),
        "raw_path": root.encode("ascii") + raw_path,
        "query_string": (parsed.query or b"") if parsed is not None else b"",
        "headers": headers,
        "subprotocols": [p for p in protocols if p],
        "state": http.get("state", {}),
        "extensions": {"websocket.http.response": {}},
    }
    return scope, accept, refusal
