"""A raw-socket WebSocket client for hostile-client tests of the gateway's uvicorn protocols
(:class:`~aiwfe.plugins.gateway.wsproto.LeanWs`, ``LeanHttp``): it writes whatever bytes a
test asks for, valid or not, and reads the server's frames and HTTP answers byte for byte.
Every read is bounded by a timeout, so a server that never answers fails the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected

from aiwfe.plugins.gateway.server import EmbeddedServer
from aiwfe.plugins.gateway.wsproto import LeanWs

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # the sample key of RFC 6455 1.3
TIMEOUT_S = 5.0


def upgrade_head(path: str = "/", *, key: str | None = KEY, version: str = "13", extra: str = "", host: bool = True) -> bytes:
    """A handshake request head (each part can be spoiled by the test)."""
    lines = [f"GET {path} HTTP/1.1"]
    if host:
        lines.append("Host: localhost")
    lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def frame(
    op: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True, length: int | None = None
) -> bytes:
    """A client frame; ``length`` overrides the encoded payload length (``payload`` is still sent)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | op
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", first, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, m | 126, n)
    else:
        head = struct.pack("!BBQ", first, m | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def only_connection(server: EmbeddedServer) -> LeanWs:
    """The server's one WebSocket connection."""
    (proto,) = server.server.server_state.connections
    assert isinstance(proto, LeanWs)
    return proto


async def until(check: Any, timeout_s: float = TIMEOUT_S) -> None:
    """Wait (polling every 10 ms) until ``check()`` is true; TimeoutError if it never is."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawClient:
    """One TCP connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> RawClient:
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock)
        client = cls(reader, writer)
        OPEN.append(client)
        return client

    @classmethod
    async def open(cls, port: int, path: str = "/", **kw: Any) -> RawClient:
        """Connect and complete a valid handshake (101)."""
        client = await cls.connect(port, **kw)
        client.writer.write(upgrade_head(path))
        status, _ = await client.http()
        assert status == 101, status
        return client

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def http(self) -> tuple[int, dict[str, str]]:
        """An HTTP answer's status and headers (lower-case names); its body is left unread."""
        async with asyncio.timeout(TIMEOUT_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        assert status_line.startswith("HTTP/1.1 "), status_line
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        return int(status_line.split()[1]), headers

    async def frame(self) -> tuple[int, int, bytes]:
        """The server's next frame: (first byte, opcode, payload); server frames are never masked."""
        async with asyncio.timeout(TIMEOUT_S):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "a server frame is masked"
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return b0, b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self) -> int | None:
        """Read frames up to the server's close frame; its code (None: no code)."""
        while True:
            b0, op, payload = await self.frame()
            if op == 0x8:
                assert b0 == 0x88
                assert len(payload) != 1 and len(payload) <= 125
                if payload[2:]:
                    payload[2:].decode()  # a close reason is UTF-8
                return struct.unpack("!H", payload[:2])[0] if payload else None

    async def eof(self) -> bool:
        """True when the server closed the socket (EOF or reset) within the timeout."""
        try:
            async with asyncio.timeout(TIMEOUT_S):
                while await self.reader.read(65536):
                    pass
        except ConnectionError:
            pass
        return True

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Plain HTTP: 200 (``/read``: after reading the whole body; ``/slow``: after 0.6 s).
    WebSocket, by path: ``/`` accept and echo each message ("close:<code>" closes with that
    code); ``/flood`` send 16 KiB frames until a send waits over 0.3 s or the client is gone;
    ``/tick`` a text every 10 ms until the client is gone; ``/never`` wait for the disconnect
    without accepting. Every disconnect goes to ``DISCONNECTS``."""
    if scope["type"] != "websocket":
        if scope["path"] == "/read":
            while (await receive()).get("more_body"):
                pass
        elif scope["path"] == "/slow":
            await asyncio.sleep(0.6)
        body = b"plain http\n"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/never":
        DISCONNECTS.append(await receive())
        return
    await send({"type": "websocket.accept"})
    if path in ("/flood", "/tick"):
        with contextlib.suppress(ClientDisconnected, TimeoutError):
            while True:
                async with asyncio.timeout(0.3 if path == "/flood" else None):
                    await send(
                        {"type": "websocket.send", "bytes": b"f" * 16_384}
                        if path == "/flood"
                        else {"type": "websocket.send", "text": "t"}
                    )
                if path == "/tick":
                    await asyncio.sleep(0.01)
        return
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            DISCONNECTS.append(msg)
            return
        text = msg.get("text")
        if text is not None and text.startswith("close:"):
            await send({"type": "websocket.close", "code": int(text[6:])})
            continue
        await send({"type": "websocket.send", **({"text": text} if text is not None else {"bytes": msg["bytes"]})})


DISCONNECTS: list[dict[str, Any]] = []
OPEN: list[RawClient] = []  # closed when the server of :func:`serving` stops


@contextlib.asynccontextmanager
async def serving(
    app: Any = echo_app, *, max_size: int = 65_536, ping_s: float = 0, pong_s: float = 0
) -> AsyncIterator[EmbeddedServer]:
    """An :class:`EmbeddedServer` (uvicorn with LeanHttp and LeanWs) on a free port."""
    DISCONNECTS.clear()
    server = EmbeddedServer(
        app, host="127.0.0.1", port=0, max_frame_bytes=max_size, ping_interval_s=ping_s, ping_timeout_s=pong_s
    )
    await server.start()
    try:
        yield server
    finally:
        for client in OPEN:
            await client.aclose()
        OPEN.clear()
        await server.stop()
