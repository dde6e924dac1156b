"""``GET /v1/ws``: the gateway's WebSocket connections as a raw ASGI handler.

This module is the connection layer; what client frames do is
:mod:`~aiwfe.plugins.gateway.commands`.

Handshake: the Origin is checked against the allowlist and the token (``Authorization:
Bearer``, ``?token=``, or ``Sec-WebSocket-Protocol: bearer, <token>``) is verified with
``auth.verify`` **before** the socket is accepted; a refusal is an ASGI close before
accept, which the server answers with HTTP 403. A user who already holds
``max_sockets_per_user`` sockets on this process (handshakes under way count) is answered
429 with ``Retry-After`` instead (ASGI's denial response; 403 on a server without it).

Per connection:

* every frame sent to the client that cannot be written at once (see "Direct paths") goes
  through one bounded queue (``send_queue_size`` frames, ``send_queue_bytes``) drained by one writer task, started when
  first needed. **Slow-reader policy**: job events wait for queue space for
  at most ``slow_reader_timeout_s`` (a replay burst is paced, not dropped); a queue that
  stays full that long, or is full when a reply frame must go out, closes the connection
  with 1013 (try again later). Nothing is dropped silently: the client reconnects and sends
  ``resume`` with the last sequence it saw. Other connections are unaffected because
  only this connection's own tasks ever wait on its queue or its socket.
* a token bucket limits client frames (``rate_per_s``, ``rate_burst``); a frame over the
  limit is answered with an ``error`` frame (``rate_limited``, ``retry_after_s``), and after
  ``rate_strikes`` such frames in a row the socket is closed with 1008.
* frames larger than ``max_frame_bytes`` close the socket with 1009 (the ASGI server
  enforces the same limit at the protocol level).
* no client frame for ``idle_timeout_s`` closes it with 1000; the server's protocol
  pings (``ping_interval_s``) find dead peers.
* **Direct paths** (uvicorn with :class:`~aiwfe.plugins.gateway.wsproto.LeanWs`, the
  default): the protocol hands each client frame to the connection by a plain call
  (``on_message``) instead of queueing it for ``receive`` and waking the reader task, and a
  frame for the client is written at once when nothing is queued before it and the
  transport is not paused (``write_text_nowait``); otherwise it takes the send queue and
  writer task above. With 10,000 sockets the queue, task switches and a timer per frame were
  a third of the gateway's CPU (PERFORMANCE.md, "Capacity"). Other servers use ``receive``
  and ``send`` as ASGI defines them; the behaviour is the same.
* on disconnect, follower tasks stop and jobs submitted with ``cancel_on_disconnect``
  are cancelled (``kernel.cancel_job``); jobs keep running otherwise and can be resumed.
* when the token is revoked (``auth.revoked``) or expires, the socket closes with 4001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import msgspec

from aiwfe.kernel import AiwfeError, Overloaded, RemoteError

from ._metrics import WS_CLOSED, WS_CONNECT_FAILURES, WS_CONNECT_SECONDS, WS_CONNECTIONS
from .commands import Commands
from .frames import CLOSE_BAD_DATA, CLOSE_ERROR, CLOSE_IDLE, CLOSE_POLICY, CLOSE_REVOKED, CLOSE_SLOW, CLOSE_TOO_BIG
from .services import GatewayServices
from .wsproto import LeanWs

__all__ = ["Connection", "Receive", "Scope", "Send", "WebSocketEndpoint", "token_from_scope"]

log = logging.getLogger("aiwfe.gateway.ws")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_enc = msgspec.json.Encoder()


def token_from_scope(scope: Scope) -> tuple[str | None, bool]:
    """Find the bearer token of a WebSocket handshake.

    Accepts ``scope`` (ASGI). Returns ``(token or None, via_subprotocol)``; the second is
    True when the token came as ``Sec-WebSocket-Protocol: bearer, <token>`` (the socket
    must then be accepted with subprotocol ``bearer``).
    """
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, tok = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and tok.strip():
                return tok.strip(), False
    protos = [p for p in scope.get("subprotocols", ()) if p]
    if len(protos) >= 2 and protos[0].lower() == "bearer":
        return protos[1], True
    qs = scope.get("query_string", b"")
    if qs:
        toks = parse_qs(qs.decode("latin-1")).get("token")
        if toks and toks[0]:
            return toks[0], False
    return None, False


class _Bucket:
    """Token bucket: ``rate_per_s`` refill, ``burst`` capacity."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0.0 on success, else seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else 60.0


class Connection:
    """One accepted WebSocket: a reader loop, one writer task, and its :class:`Commands`."""

    def __init__(self, services: GatewayServices, send: Send, receive: Receive, jti: str, exp: float, sub: str) -> None:
        cfg = services.config
        self.config = cfg
        self._send = send
        self._receive = receive
        self.jti = jti
        self.exp = exp
        self.sub = sub
        self.out: asyncio.Queue[str | None] = asyncio.Queue(maxsize=cfg.send_queue_size)  # None: stop writing
        self._queued = 0  # characters of the frames in ``out`` (bounded by send_queue_bytes)
        self._room = asyncio.Event()  # set by the writer each time it takes a frame
        self.commands = Commands(services, self, sub)
        self.closing = False
        self.close_code: int | None = None
        self.finished = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._bucket = _Bucket(cfg.rate_per_s, cfg.rate_burst)
        self._strikes = 0
        self._cleaning = False
        self._closer: asyncio.Task[None] | None = None
        self._last_frame = time.monotonic()
        self._idle: asyncio.TimerHandle | None = None
        self._sending = False  # the writer task is inside send(): nothing may overtake its frame
        proto = getattr(send, "__self__", None)
        self._proto = proto if isinstance(proto, LeanWs) else None  # the direct paths (module doc)

    # -- sending --------------------------------------------------------------------

    def push(self, frame: dict[str, Any]) -> bool:
        """Queue a frame for the client; on a full queue close with 1013 (see module doc).

        Returns False when the frame was not queued.
        """
        if self.closing:
            return False
        data = _enc.encode(frame)
        if self._write_now(data):
            return True
        self._start_writer()
        text = data.decode()
        if self._enqueue(text):
            return True
        log.info("ws %s: send queue full (%d frames, %d chars); closing a slow reader", self.jti, self.out.qsize(), self._queued)
        self.close_soon(CLOSE_SLOW, "send queue full; reconnect and resume")
        return False

    def _fits(self, text: str) -> bool:
        """The frame fits the queue's byte budget (an empty queue takes any one frame)."""
        return self._queued + len(text) <= self.config.send_queue_bytes or self.out.empty()

    def _enqueue(self, text: str) -> bool:
        """Queue ``text`` at once if it fits, in frames and in bytes."""
        if self._fits(text):
            with contextlib.suppress(asyncio.QueueFull):
                self.out.put_nowait(text)
                self._queued += len(text)
                return True
        return False

    async def put(self, frame: dict[str, Any]) -> bool:
        """Queue a job event, waiting up to ``slow_reader_timeout_s`` for space (see module doc).

        Returns False when the frame was not queued (the connection is closing).
        """
        if self.closing:
            return False
        data = _enc.encode(frame)
        if self._write_now(data):
            return True
        self._start_writer()
        text = data.decode()
        if self._enqueue(text):
            return True
        try:
            async with asyncio.timeout(self.config.slow_reader_timeout_s):
                while not self._fits(text):  # frames and bytes are both bounded
                    self._room.clear()
                    await self._room.wait()
                self._queued += len(text)  # counted before the put: the writer may take it at once
                try:
                    await self.out.put(text)
                except BaseException:
                    self._queued -= len(text)
                    raise
            return not self.closing
        except TimeoutError:
            log.info("ws %s: send queue full for %.1f s; closing the slow reader", self.jti, self.config.slow_reader_timeout_s)
            self.close_soon(CLOSE_SLOW, "send queue full; reconnect and resume")
            return False

    def _write_now(self, data: bytes) -> bool:
        """Write a frame at once when nothing queued must go before it and the transport takes
        it without waiting (uvicorn with :class:`~aiwfe.plugins.gateway.wsproto.LeanWs`); False: queue it."""
        proto = self._proto
        return proto is not None and not self._sending and self.out.empty() and proto.write_text_nowait(data)

    def _start_writer(self) -> None:
        # Started on the first frame that must wait: with the direct path most sockets never need one.
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while True:
            text = await self.out.get()
            if text is None:
                return
            self._queued -= len(text)
            self._room.set()
            self._sending = True
            try:
                await self._send({"type": "websocket.send", "text": text})
            finally:
                self._sending = False

    def close_soon(self, code: int, reason: str) -> None:
        """Close the socket with ``code`` from any task (idempotent)."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        WS_CLOSED.labels(str(code)).inc()
        self._closer = asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        # Ordering rule: stop the writer first so that only one task ever sends. Frames
        # already queued (pongs, the rate-limit errors) go out first unless the reader is slow.
        if self._writer is not None:
            flushed = False
            if code != CLOSE_SLOW:
                with contextlib.suppress(asyncio.QueueFull):
                    self.out.put_nowait(None)
                    done, _ = await asyncio.wait([self._writer], timeout=1.0)
                    flushed = bool(done)
            if not flushed:
                self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
        if self._reader is not None and not self._cleaning and self._reader is not asyncio.current_task():
            self._reader.cancel()

    # -- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client leaves or it is closed."""
        loop = asyncio.get_running_loop()
        self._reader = asyncio.current_task()
        ttl_s = self.exp - time.time()
        expiry = loop.call_later(max(0.0, ttl_s), self.close_soon, CLOSE_REVOKED, "token expired") if self.exp else None
        self._idle = loop.call_later(self.config.idle_timeout_s, self._idle_check)
        proto = self._proto
        if proto is not None and proto.queue.empty():
            proto.on_message = self._on_message  # frames arrive by call; receive() sees the disconnect
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # we cancelled ourselves to stop reading: not a cancellation of the handler
        finally:
            if proto is not None:
                proto.on_message = None
            if expiry is not None:
                expiry.cancel()
            if self._idle is not None:
                self._idle.cancel()
            await self._cleanup()

    async def _read_loop(self) -> None:
        while not self.closing:
            msg = await self._receive()
            if msg["type"] == "websocket.disconnect":
                self.closing = True
                return
            data = msg.get("text")
            if data is None:
                data = msg.get("bytes") or b""
            if not self._frame(data, len(data) if isinstance(data, bytes) else len(data.encode())):
                return

    def _on_message(self, data: bytes, text: bool) -> None:
        """A client frame straight from :class:`~aiwfe.plugins.gateway.wsproto.LeanWs` (no queue, no task switch)."""
        if self.closing:
            return
        if text:
            try:
                data.decode()
            except UnicodeDecodeError:
                self.close_soon(CLOSE_BAD_DATA, "text frame is not UTF-8")
                return
        try:
            self._frame(data, len(data))
        except Exception:  # it runs inside the protocol's data_received: never let it break the transport
            log.exception("ws %s: frame handling failed", self.jti)
            self.close_soon(CLOSE_ERROR, "internal error")

    def _frame(self, data: str | bytes, size: int) -> bool:
        """Handle one client frame of ``size`` bytes; False when it closes the connection."""
        cfg = self.config
        self._last_frame = time.monotonic()
        if size > cfg.max_frame_bytes:
            self.close_soon(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds {cfg.max_frame_bytes}")
            return False
        wait_s = self._bucket.take()
        if wait_s:
            self._strikes += 1
            if self._strikes > cfg.rate_strikes:
                self.close_soon(CLOSE_POLICY, "rate limit exceeded")
                return False
            self.push({"type": "error", "code": "rate_limited", "message": "too many frames", "retry_after_s": wait_s})
            return True
        self._strikes = 0
        self.commands.dispatch(data)
        return True

    def _idle_check(self) -> None:
        # One timer per idle period rather than one per frame: re-armed for what is left.
        if self.closing:
            return
        left = self._last_frame + self.config.idle_timeout_s - time.monotonic()
        if left > 0:
            self._idle = asyncio.get_running_loop().call_later(left, self._idle_check)
        else:
            self.close_soon(CLOSE_IDLE, "idle timeout")

    async def _cleanup(self) -> None:
        self.closing = True
        self._cleaning = True
        if self._closer is not None:
            # Ordering rule: let the close frame go out before the handler returns (the
            # server drops the connection without one when the app finishes first).
            with contextlib.suppress(BaseException):
                await self._closer
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(BaseException):
                await self._writer
        await self.commands.close()
        self.finished.set()


class WebSocketEndpoint:
    """The ASGI callable of ``/v1/ws`` for one gateway."""

    def __init__(self, services: GatewayServices) -> None:
        self.services = services

    def _origin_ok(self, scope: Scope) -> bool:
        origin = host = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        if origin is None:
            return True  # not a browser: Origin protects browsers' ambient credentials only
        allowed = self.services.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # Same origin (the console page served by this gateway) is always allowed.
        return host is not None and origin.split("://", 1)[-1] == host

    async def _refuse(self, send: Send, reason: str) -> None:
        WS_CONNECT_FAILURES.labels(reason).inc()
        await send({"type": "websocket.close", "code": CLOSE_POLICY})

    async def _deny(self, scope: Scope, send: Send, status: int, reason: str, detail: str) -> None:
        """Refuse the handshake with an HTTP answer (``status``, the JSON error shape,
        ``Retry-After``) where the server has ASGI's denial response, else as :meth:`_refuse`."""
        if "websocket.http.response" not in scope.get("extensions", {}):
            await self._refuse(send, reason)
            return
        WS_CONNECT_FAILURES.labels(reason).inc()
        retry = b"%d" % max(1, round(self.services.config.retry_after_s))
        headers = [(b"content-type", b"application/json"), (b"retry-after", retry)]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": _enc.encode({"status_code": status, "detail": detail})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one WebSocket (ASGI)."""
        t0 = time.perf_counter()
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        if not self._origin_ok(scope):
            await self._refuse(send, "origin")
            return
        token, via_proto = token_from_scope(scope)
        if token is None:
            await self._refuse(send, "no_token")
            return
        try:
            claims = await self.services.verify(token)
        except AiwfeError as e:
            if isinstance(e, Overloaded):
                reason = "overloaded"
            elif isinstance(e, RemoteError) and e.type == "InvalidToken":
                reason = "invalid_token"
            else:
                reason = "unavailable"
            log.debug("ws handshake refused (%s): %s", reason, e)
            await self._refuse(send, reason)
            return
        hub = self.services.hub
        if hub.is_revoked(claims.jti):
            await self._refuse(send, "revoked")
            return
        limit = self.services.config.max_sockets_per_user
        if not hub.hold(claims.sub, limit):
            await self._deny(scope, send, 429, "too_many_sockets", f"at most {limit} WebSockets per user are open at once")
            return
        try:
            await send({"type": "websocket.accept", "subprotocol": "bearer" if via_proto else None})
            WS_CONNECT_SECONDS.observe(time.perf_counter() - t0)
            conn = Connection(self.services, send, receive, claims.jti, float(claims.exp), claims.sub)
            hub.add(conn)
            WS_CONNECTIONS.inc()
            try:
                await conn.run()
            finally:
                hub.remove(conn)
                WS_CONNECTIONS.dec()
        finally:
            hub.release(claims.sub)
