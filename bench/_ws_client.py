"""The benchmarks' WebSocket client: a minimal RFC 6455 client (:class:`RawWs`) and a timed
connect (:func:`open_timed`), shared by ``aiwfe bench ws``, ``auth-burst`` and the load scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from urllib.parse import urlsplit

__all__ = ["HandshakeRefused", "LeanWs", "RawWs", "open_timed"]


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


# -- a lean client for the capacity benchmarks -------------------------------------------


class LeanWs(asyncio.Protocol):
    """A WebSocket client as a bare :class:`asyncio.Protocol`, for the capacity benchmarks
    (``aiwfe bench ws``, ``auth-burst``), where the load generator shares two cores with the
    servers it measures.

    :class:`RawWs` costs a task wake-up and three ``StreamReader.readexactly`` calls per frame
    received (≈ 50 µs of CPU per message at 10,000 sockets, a quarter of the machine); here
    the handshake answer and the frames are parsed in :meth:`data_received` and each text
    frame goes to :attr:`on_text` by a plain call. Same wire behaviour as :class:`RawWs`:
    masked text frames (zero key), pings answered, a close frame ends the socket.
    """

    __slots__ = ("_buf", "_handshake", "_request", "closed", "on_close", "on_text", "transport")

    #: Largest handshake answer read before giving up (a misbehaving server must not grow it).
    MAX_HEAD = 65_536

    def __init__(self, request: bytes, handshake: asyncio.Future[None]) -> None:
        self._request = request
        self._handshake = handshake
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.on_text: Callable[[bytes], None] | None = None
        self.on_close: Callable[[], None] | None = None
        self.closed = False

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> LeanWs:
        """Open ``ws://host:port/path`` with extra ``headers``.

        Raises:
            HandshakeRefused: a status other than 101; OSError, TimeoutError: network.
        """
        u = urlsplit(url)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        path = u.path + (f"?{u.query}" if u.query else "")
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        transport = None
        try:
            async with asyncio.timeout(timeout_s):
                transport, proto = await loop.create_connection(lambda: cls(request, handshake), u.hostname, u.port)
                await handshake
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionError("connection closed during the handshake"))
        if self.on_close is not None:
            self.on_close()

    def data_received(self, data: bytes) -> None:
        if not self._handshake.done():
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > self.MAX_HEAD:
                    self._handshake.set_exception(HandshakeRefused("handshake answer too large"))
                    self.abort()
                return
            head = bytes(self._buf[:end])
            rest = bytes(self._buf[end + 4 :])
            self._buf.clear()
            if not head.startswith(b"HTTP/1.1 101"):
                self._handshake.set_exception(HandshakeRefused(head.split(b"\r\n", 1)[0].decode(errors="replace")))
                self.abort()
                return
            self._handshake.set_result(None)
            if not rest:
                return
            data = rest
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        pos, size = 0, len(data)
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            payload = data[pos + head : pos + head + n]
            pos += head + n
            op = b0 & 0x0F
            if op == 0x1:
                if self.on_text is not None:
                    self.on_text(payload)
            elif op == 0x9:  # ping → pong with the same payload
                self.send_frame(0x8A, payload)
            elif op == 0x8:
                self.close()
                return
        if pos < size:
            buf += data[pos:]

    def send_frame(self, opcode_byte: int, data: bytes) -> None:
        """Write one frame (masked with a zero key: masking is mandatory, its value is not)."""
        n = len(data)
        if n < 126:
            head = bytes((opcode_byte, 0x80 | n))
        elif n < 65536:
            head = bytes((opcode_byte, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((opcode_byte, 0x80 | 127)) + n.to_bytes(8, "big")
        if self.transport is not None and not self.closed:
            self.transport.write(head + b"\x00\x00\x00\x00" + data)

    def send(self, text: bytes) -> None:
        """Send one text frame of UTF-8 ``text``."""
        self.send_frame(0x81, text)

    def close(self) -> None:
        """Send a close frame and drop the connection."""
        if self.transport is not None and not self.closed:
            self.send_frame(0x88, (1000).to_bytes(2, "big"))
            self.transport.close()
        self.closed = True

    def abort(self) -> None:
        """Drop the connection without a close frame."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
