"""The benchmarks' WebSocket client: a minimal RFC 6455 client (:class:`RawWs`) and a timed
connect (:func:`open_timed`), shared by ``aiwfe bench ws``, ``auth-burst`` and the load scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

__all__ = ["HandshakeRefused", "RawWs", "open_timed"]


class HandshakeRefused(Exception):
    """The server answered the upgrade with something other than 101."""


class RawWs:
    """A minimal WebSocket client for load generation (text frames, masked, no extensions).

    The ``websockets`` client costs about a millisecond of CPU per handshake and tens of
    microseconds per frame, which on a 2-core machine starves the server being measured;
    this one does the handshake and framing with a few ``bytes`` operations. Both the
    gateway and the echo baseline are measured with it.
    """

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> RawWs:
        """Open ``ws://host:port/path`` with extra ``headers``.

        Raises:
            HandshakeRefused: a status other than 101; OSError, TimeoutError: network.
        """

        u = urlsplit(url)
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(u.hostname, u.port)
            extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            path = u.path + (f"?{u.query}" if u.query else "")
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise HandshakeRefused(head.split(b"\r\n", 1)[0].decode(errors="replace"))
        return cls(reader, writer)

    def send(self, text: str) -> None:
        """Send one text frame (masked with a zero key: masking is mandatory, its value is not)."""
        data = text.encode()
        n = len(data)
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 65536:
            head = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
        self.writer.write(head + b"\x00\x00\x00\x00" + data)

    async def recv(self) -> str:
        """Receive the next text frame (answers pings).

        Raises:
            ConnectionError: the server closed the connection.
        """
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(n) if n else b""
            op = b0 & 0x0F
            if op == 0x1:
                return payload.decode()
            if op == 0x9:  # ping → pong with the same payload
                self.writer.write(bytes((0x8A, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload)
            elif op == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise ConnectionError(f"closed by the server ({code})")

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        with contextlib.suppress(Exception):
            self.writer.write(bytes((0x88, 0x82)) + b"\x00\x00\x00\x00" + (1000).to_bytes(2, "big"))
            self.writer.close()


async def open_timed(
    url: str,
    headers: dict[str, str],
    opened: list[RawWs],
    connect_ms: list[float],
    failures: list[str],
    timeout_s: float = 30.0,
) -> None:
    """Open one socket for a load generator: append it to ``opened`` and its handshake time
    (ms) to ``connect_ms``, or ``"Type: message"`` to ``failures``."""
    t0 = time.perf_counter()
    try:
        ws = await RawWs.connect(url, headers, timeout_s=timeout_s)
    except Exception as e:
        failures.append(f"{type(e).__name__}: {e}"[:120])
        return
    connect_ms.append((time.perf_counter() - t0) * 1000)
    opened.append(ws)


# -- load generator -------------------------------------------------------------------
