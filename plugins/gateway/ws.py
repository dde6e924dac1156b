"""``GET /v1/ws``: the gateway's WebSocket endpoint as a raw ASGI handler.

Handshake: the Origin is checked against the allowlist and the token (``Authorization:
Bearer``, ``?token=``, or ``Sec-WebSocket-Protocol: bearer, <token>``) is verified with
``auth.verify`` **before** the socket is accepted; a refusal is an ASGI close before
accept, which the server answers with HTTP 403.

Per connection:

* every frame sent to the client goes through one bounded queue (``send_queue_size``)
  drained by one writer task. **Slow-reader policy**: job events wait for queue space for
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
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from aiwfe.kernel.errors import AiwfeError, Overloaded, RemoteError

from . import frames
from ._metrics import WS_CLOSED, WS_CONNECT_FAILURES, WS_CONNECT_SECONDS, WS_CONNECTIONS

if TYPE_CHECKING:
    from .plugin import GatewayPlugin

__all__ = [
    "CLOSE_IDLE",
    "CLOSE_POLICY",
    "CLOSE_REVOKED",
    "CLOSE_SLOW",
    "CLOSE_TOO_BIG",
    "Connection",
    "Hub",
    "WebSocketEndpoint",
    "token_from_scope",
]

log = logging.getLogger("aiwfe.gateway.ws")

CLOSE_IDLE = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SLOW = 1013
CLOSE_REVOKED = 4001

TERMINAL = {"job.done": "done", "job.failed": "failed", "job.cancelled": "cancelled"}
MAX_CALLS_IN_FLIGHT = 16
MAX_FOLLOWED_JOBS = 64

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


class Hub:
    """The open connections of one gateway, by token id (``jti``)."""

    def __init__(self) -> None:
        self.by_jti: dict[str, set[Connection]] = {}
        self.revoked: dict[str, float] = {}  # jti → exp (epoch seconds); pruned as they expire

    def add(self, conn: Connection) -> None:
        """Register an accepted connection."""
        self.by_jti.setdefault(conn.jti, set()).add(conn)

    def remove(self, conn: Connection) -> None:
        """Forget a connection (idempotent)."""
        conns = self.by_jti.get(conn.jti)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.by_jti[conn.jti]

    def count(self) -> int:
        """Open connections."""
        return sum(len(c) for c in self.by_jti.values())

    def is_revoked(self, jti: str) -> bool:
        """True when ``jti`` was revoked and has not expired yet."""
        exp = self.revoked.get(jti)
        return exp is not None and exp > time.time()

    def revoke(self, jti: str, exp: float) -> int:
        """Remember ``jti`` as revoked until ``exp`` and close its sockets with 4001; return how many."""
        now = time.time()
        self.revoked[jti] = exp
        if len(self.revoked) > 10_000:
            self.revoked = {j: e for j, e in self.revoked.items() if e > now}
        conns = list(self.by_jti.get(jti, ()))
        for c in conns:
            c.close_soon(CLOSE_REVOKED, "token revoked")
        return len(conns)

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down") -> None:
        """Close every connection (at shutdown) and wait for their handlers to finish, up to 5 s."""
        conns = [c for cs in self.by_jti.values() for c in cs]
        for c in conns:
            c.close_soon(code, reason)
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.finished.wait()) for c in conns], timeout=5.0)


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
    """One accepted WebSocket: a reader loop, one writer task, follower and call tasks."""

    def __init__(self, gw: GatewayPlugin, send: Send, receive: Receive, jti: str, exp: float, sub: str) -> None:
        cfg = gw.config
        self.gw = gw
        self.kernel = gw.kernel
        self._send = send
        self._receive = receive
        self.jti = jti
        self.exp = exp
        self.sub = sub
        self.out: asyncio.Queue[str | None] = asyncio.Queue(maxsize=cfg.send_queue_size)  # None: stop writing
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.calls: set[asyncio.Task[None]] = set()
        self.cancel_on_disconnect: set[str] = set()
        self.closing = False
        self.close_code: int | None = None
        self.finished = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._bucket = _Bucket(cfg.rate_per_s, cfg.rate_burst)
        self._strikes = 0
        self._cleaning = False
        self._closer: asyncio.Task[None] | None = None

    # -- sending --------------------------------------------------------------------

    def push(self, frame: dict[str, Any]) -> bool:
        """Queue a frame for the client; on a full queue close with 1013 (see module doc).

        Returns False when the frame was not queued.
        """
        if self.closing:
            return False
        try:
            self.out.put_nowait(_enc.encode(frame).decode())
            return True
        except asyncio.QueueFull:
            log.info("ws %s: send queue full (%d frames); closing the slow reader", self.jti, self.out.maxsize)
            self.close_soon(CLOSE_SLOW, "send queue full; reconnect and resume")
            return False

    async def put(self, frame: dict[str, Any]) -> bool:
        """Queue a job event, waiting up to ``slow_reader_timeout_s`` for space (see module doc).

        Returns False when the frame was not queued (the connection is closing).
        """
        if self.closing:
            return False
        text = _enc.encode(frame).decode()
        try:
            self.out.put_nowait(text)
            return True
        except asyncio.QueueFull:
            pass
        try:
            async with asyncio.timeout(self.gw.config.slow_reader_timeout_s):
                await self.out.put(text)
            return not self.closing
        except TimeoutError:
            log.info("ws %s: send queue full for %.1f s; closing the slow reader", self.jti, self.gw.config.slow_reader_timeout_s)
            self.close_soon(CLOSE_SLOW, "send queue full; reconnect and resume")
            return False

    async def _write_loop(self) -> None:
        while True:
            text = await self.out.get()
            if text is None:
                return
            await self._send({"type": "websocket.send", "text": text})

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
        self._writer = loop.create_task(self._write_loop())
        ttl_s = self.exp - time.time()
        expiry = loop.call_later(max(0.0, ttl_s), self.close_soon, CLOSE_REVOKED, "token expired") if self.exp else None
        try:
            await self._read_loop()
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # we cancelled ourselves to stop reading: not a cancellation of the handler
        finally:
            if expiry is not None:
                expiry.cancel()
            await self._cleanup()

    async def _read_loop(self) -> None:
        cfg = self.gw.config
        while not self.closing:
            try:
                async with asyncio.timeout(cfg.idle_timeout_s):
                    msg = await self._receive()
            except TimeoutError:
                self.close_soon(CLOSE_IDLE, "idle timeout")
                return
            if msg["type"] == "websocket.disconnect":
                self.closing = True
                return
            data = msg.get("text")
            if data is None:
                data = msg.get("bytes") or b""
            size = len(data) if isinstance(data, bytes) else len(data.encode())
            if size > cfg.max_frame_bytes:
                self.close_soon(CLOSE_TOO_BIG, f"frame of {size} bytes exceeds {cfg.max_frame_bytes}")
                return
            wait_s = self._bucket.take()
            if wait_s:
                self._strikes += 1
                if self._strikes > cfg.rate_strikes:
                    self.close_soon(CLOSE_POLICY, "rate limit exceeded")
                    return
                self.push({"type": "error", "code": "rate_limited", "message": "too many frames", "retry_after_s": wait_s})
                continue
            self._strikes = 0
            self._dispatch(data)

    def _dispatch(self, data: str | bytes) -> None:
        try:
            frame = frames.decode_frame(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.push({"type": "error", "code": "bad_frame", "message": str(e)})
            return
        match frame:
            case frames.Ping():
                self.push({"type": "pong", "id": frame.id})
            case frames.Submit():
                self._spawn(self._submit(frame))
            case frames.Resume():
                self._spawn(self._resume(frame))
            case frames.Cancel():
                self._spawn(self._cancel(frame))
            case frames.Call():
                self._spawn(self._call(frame))

    def _spawn(self, coro: Awaitable[None]) -> None:
        if len(self.calls) >= MAX_CALLS_IN_FLIGHT:
            close = getattr(coro, "close", None)
            if close is not None:
                close()
            self.push({"type": "error", "code": "too_many_in_flight", "message": f"at most {MAX_CALLS_IN_FLIGHT} at once"})
            return
        t: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.calls.add(t)
        t.add_done_callback(self.calls.discard)

    def _error(self, e: AiwfeError, ref: str = "", **extra: Any) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "error", "code": e.code, "message": e.message, "id": ref, **extra}
        if isinstance(e, RemoteError):
            frame["code"] = e.type
        if e.retryable:
            frame["retry_after_s"] = e.retry_after_s or self.gw.config.retry_after_s
        return frame

    async def _submit(self, f: frames.Submit) -> None:
        address = self.gw.config.job_kinds.get(f.kind)
        if address is None:
            known = ", ".join(sorted(self.gw.config.job_kinds)) or "none configured"
            self.push(
                {"type": "error", "code": "unknown_kind", "message": f"unknown job kind {f.kind!r}; known: {known}", "id": f.id}
            )
            return
        try:
            job_id = await self.gw.submit(address, f.input, self.sub, f.idempotency_key)
        except AiwfeError as e:
            self.push(self._error(e, f.id))
            return
        if f.cancel_on_disconnect:
            self.cancel_on_disconnect.add(job_id)
        self.push({"type": "accepted", "id": f.id, "job_id": job_id})
        self._follow(job_id, 0)

    async def _owned(self, job_id: str, ref: str) -> bool:
        """True when this socket's user owns ``job_id``; else an error frame (``not_found``:
        someone else's job is indistinguishable from no job)."""
        try:
            if await self.gw.owns(job_id, self.sub):
                return True
        except AiwfeError as e:
            self.push(self._error(e, ref, job_id=job_id))
            return False
        self.push({"type": "error", "code": "not_found", "message": f"no job {job_id}", "id": ref, "job_id": job_id})
        return False

    async def _resume(self, f: frames.Resume) -> None:
        if await self._owned(f.job_id, f.id):
            self._follow(f.job_id, f.after_seq)

    async def _cancel(self, f: frames.Cancel) -> None:
        if not await self._owned(f.job_id, f.id):
            return
        try:
            cancelled = await self.kernel.cancel_job(f.job_id, "cancelled by the client")
        except AiwfeError as e:
            self.push(self._error(e, f.id, job_id=f.job_id))
            return
        self.push({"type": "cancelled", "id": f.id, "job_id": f.job_id, "cancelled": cancelled})

    async def _call(self, f: frames.Call) -> None:
        contract = self.gw.ws_calls.get(f.contract)
        if contract is None:
            self.push(
                {"type": "error", "code": "unknown_contract", "message": f"{f.contract!r} may not be called here", "id": f.id}
            )
            return
        try:
            req: Any = msgspec.convert(f.input, contract)
        except msgspec.ValidationError as e:
            self.push({"type": "error", "code": "bad_frame", "message": f"{f.contract}: {e}", "id": f.id})
            return
        try:
            reply = await self.kernel.call(req, timeout_s=self.gw.config.call_timeout_s)
        except AiwfeError as e:
            self.push(self._error(e, f.id))
            return
        self.push({"type": "reply", "id": f.id, "result": msgspec.to_builtins(reply)})

    def _follow(self, job_id: str, after_seq: int) -> None:
        old = self.followers.pop(job_id, None)
        if old is not None:
            old.cancel()
        elif len(self.followers) >= MAX_FOLLOWED_JOBS:
            msg = f"at most {MAX_FOLLOWED_JOBS} jobs followed per socket; wait for results or reconnect"
            self.push({"type": "error", "code": "too_many_jobs", "message": msg, "job_id": job_id})
            return
        t = asyncio.get_running_loop().create_task(self._follow_job(job_id, after_seq))
        self.followers[job_id] = t
        t.add_done_callback(lambda _t: self.followers.pop(job_id, None) if self.followers.get(job_id) is _t else None)

    async def _follow_job(self, job_id: str, after_seq: int) -> None:
        try:
            async for ev in self.kernel.job_events(job_id, after_seq):
                status = TERMINAL.get(ev.type)
                if status is None:
                    if not await self.put({"type": "event", "job_id": job_id, "seq": ev.seq, "event": ev.type, "data": ev.data}):
                        return
                    continue
                frame: dict[str, Any] = {"type": "result", "job_id": job_id, "seq": ev.seq, "status": status}
                frame["result" if status == "done" else "error"] = ev.data
                await self.put(frame)
                self.cancel_on_disconnect.discard(job_id)
                return
        except AiwfeError as e:
            self.push(self._error(e, job_id=job_id))

    async def _cleanup(self) -> None:
        self.closing = True
        self._cleaning = True
        if self._closer is not None:
            # Ordering rule: let the close frame go out before the handler returns (the
            # server drops the connection without one when the app finishes first).
            with contextlib.suppress(BaseException):
                await self._closer
        tasks = [*self.followers.values(), *self.calls]
        if self._writer is not None:
            tasks.append(self._writer)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for job_id in list(self.cancel_on_disconnect):
            try:
                await self.kernel.cancel_job(job_id, "client disconnected")
            except AiwfeError as e:
                log.warning("ws: cancelling job %s on disconnect failed: %s", job_id, e)
        self.finished.set()


class WebSocketEndpoint:
    """The ASGI callable of ``/v1/ws`` for one gateway."""

    def __init__(self, gw: GatewayPlugin) -> None:
        self.gw = gw

    def _origin_ok(self, scope: Scope) -> bool:
        origin = host = None
        for name, value in scope.get("headers", ()):
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"host":
                host = value.decode("latin-1")
        if origin is None:
            return True  # not a browser: Origin protects browsers' ambient credentials only
        allowed = self.gw.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # Same origin (the console page served by this gateway) is always allowed.
        return host is not None and origin.split("://", 1)[-1] == host

    async def _refuse(self, send: Send, reason: str) -> None:
        WS_CONNECT_FAILURES.labels(reason).inc()
        await send({"type": "websocket.close", "code": CLOSE_POLICY})

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
            claims = await self.gw.verify(token)
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
        if self.gw.hub.is_revoked(claims.jti):
            await self._refuse(send, "revoked")
            return
        await send({"type": "websocket.accept", "subprotocol": "bearer" if via_proto else None})
        WS_CONNECT_SECONDS.observe(time.perf_counter() - t0)
        conn = Connection(self.gw, send, receive, claims.jti, float(claims.exp), claims.sub)
        self.gw.hub.add(conn)
        WS_CONNECTIONS.inc()
        try:
            await conn.run()
        finally:
            self.gw.hub.remove(conn)
            WS_CONNECTIONS.dec()
