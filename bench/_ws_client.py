"""The benchmarks' WebSocket client: a minimal RFC 6455 client (:class:`RawWs`) and a timed
connect (:func:`open_timed`), shared by ``aiwfe bench ws``, ``auth-burst`` and the load scenarios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec

__all__ = ["HandshakeRefused", "LeanWs", "RawWs", "load_runner", "open_timed", "run_load"]


def load_runner() -> tuple[Any, str]:
    """``(run, name)``: how a load-generator process runs its loop — uvloop's when installed
    (extra ``aiwfe[bench]``; about a quarter less CPU per frame for the load, which shares the
    cores with the servers it measures), else asyncio's. Servers keep asyncio's loop unless
    asked otherwise (``bench ws --uvloop``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run, "asyncio"
    return uvloop.run, "uvloop"


def _upgrade_request(url: str, headers: dict[str, str] | None) -> bytes:
    """The opening handshake for ``ws://host:port/path`` with extra ``headers`` (a fixed key:
    the load generators do not check the server's accept value)."""
    u = urlsplit(url)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    path = u.path + (f"?{u.query}" if u.query else "")
    return (
        f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


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
            writer.write(_upgrade_request(url, headers))
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
        request = _upgrade_request(url, headers)
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()
        transport = None
        try:
            async with asyncio.timeout(timeout_s):
                host, port = u.hostname or "127.0.0.1", u.port or 80
                transport, proto = await loop.create_connection(lambda: cls(request, handshake), host, port)
                await handshake
        except BaseException:
            if transport is not None:
                transport.abort()
            raise
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transport is not a subclass: no isinstance
        self.transport.write(self._request)

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
            hlen = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
                hlen = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                hlen = 10
            if size - pos < hlen + n:
                break
            payload = data[pos + hlen : pos + hlen + n]
            pos += hlen + n
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


# -- the load generator of bench ws ----------------------------------------------------------


async def run_load(
    url: str, n: int, seconds: float, mode: str, ramp: int, warmup: int, token: Callable[[str], str]
) -> dict[str, Any]:
    """One load generator: open ``n`` sockets (at most ``ramp`` handshakes at once), wait for
    GO on stdin, then send one frame a second on each socket for ``seconds`` (``mode``
    ``gateway``: ``call`` frames to perception with a bearer token from ``token(subject)``;
    ``echo``: echo frames); print ``{"done"}``, wait for a line on stdin, close the sockets.

    Open loop on a fixed schedule: socket *i* sends at ``start + phase_i + k`` (phases spread
    over the second), whatever the replies do, except that a socket has at most one frame
    outstanding: a send that falls due before the previous reply has come goes out when that
    reply arrives (then its latency counts from that moment, as with the former per-socket
    task). One scheduler task and :class:`LeanWs` protocols: no task, timer or stream read
    per frame, so that the load generator takes as little as possible of the cores it shares
    with the servers it measures.
    """
    conns: list[LeanWs] = []
    failures: list[str] = []
    connect_ms: list[float] = []
    sem = asyncio.Semaphore(ramp)

    async def open_one(i: int) -> None:
        headers = {"Authorization": f"Bearer {token(f'u{os.getpid()}-{i}')}"} if mode == "gateway" else {}
        async with sem:
            t0 = time.perf_counter()
            try:
                ws = await LeanWs.connect(url, headers, timeout_s=60)
            except Exception as e:
                failures.append(f"{type(e).__name__}: {e}"[:120])
                return
            connect_ms.append((time.perf_counter() - t0) * 1000)
            conns.append(ws)

    await asyncio.gather(*(open_one(i) for i in range(n)))
    print(json.dumps({"connected": len(conns)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # GO

    text = "How fast is the database index on the orders table?"
    if mode == "gateway":
        body = {"type": "call", "contract": "perception.perceive", "input": {"text": text}, "id": ""}
    else:
        body = {"type": "echo", "input": {"text": text}, "id": ""}
    prefix = json.dumps(body).encode()[: -len(b'""}')] + b'"'  # everything up to the id's value
    decode = msgspec.json.Decoder(_Reply).decode
    lat_ms: list[float] = []
    errors = 0
    closed = 0
    n_socks = len(conns)
    sent = [0] * n_socks  # frames sent per socket
    t_sent = [0.0] * n_socks  # perf_counter of the outstanding frame, 0.0: none outstanding
    owed = [False] * n_socks  # a send fell due while a frame was outstanding
    done = asyncio.Event()
    outstanding = 0
    finished = False

    def send(i: int) -> None:
        nonlocal outstanding
        k = sent[i] + 1
        sent[i] = k
        t_sent[i] = time.perf_counter()
        outstanding += 1
        conns[i].send(prefix + str(k).encode() + b'"}')

    def make_handlers(i: int) -> tuple[Any, Any]:
        def on_text(payload: bytes) -> None:
            nonlocal errors, outstanding
            t0 = t_sent[i]
            if not t0:
                return  # nothing outstanding: not an answer to a frame of ours
            now = time.perf_counter()
            t_sent[i] = 0.0
            outstanding -= 1
            if sent[i] > warmup:
                lat_ms.append((now - t0) * 1000)
            if mode == "gateway":
                try:
                    if decode(payload).type != "reply":
                        errors += 1
                except msgspec.DecodeError:
                    errors += 1
            if owed[i]:
                owed[i] = False
                send(i)
            elif finished and not outstanding:
                done.set()

        def on_close() -> None:
            nonlocal closed, outstanding, errors
            closed += 1
            if t_sent[i]:  # its frame will never be answered: an error, besides the closed socket
                t_sent[i] = 0.0
                outstanding -= 1
                errors += 1
            owed[i] = False
            if finished and not outstanding:
                done.set()

        return on_text, on_close

    for i, ws in enumerate(conns):
        ws.on_text, ws.on_close = make_handlers(i)
    schedule = sorted((random.random(), i) for i in range(n_socks))
    cpu0 = time.process_time()
    start = loop.time()
    for second in range(int(seconds)):
        for phase, i in schedule:
            at = start + second + phase
            delay = at - loop.time()
            if delay > 0.0005:
                await asyncio.sleep(delay)
            if conns[i].closed:
                continue
            if t_sent[i]:
                owed[i] = True
            else:
                send(i)
    finished = True
    if outstanding:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 120)
    errors += outstanding  # frames never answered
    cpu_s = time.process_time() - cpu0
    print(json.dumps({"done": True}), flush=True)  # the servers' CPU is read before the sockets close
    await loop.run_in_executor(None, sys.stdin.readline)  # CLOSE
    for ws in conns:
        ws.close()
    return {
        "frames": sum(sent),
        "cpu_s": cpu_s,
        "connected": len(conns),
        "failures": failures,
        "errors": errors,
        "closed": closed,
        "lat_ms": lat_ms,
        "connect_ms": connect_ms,
    }


class _Reply(msgspec.Struct):
    type: str = ""
