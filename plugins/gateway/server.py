"""The ASGI server embedded in the gateway pod's own event loop.

**Default: uvicorn** with the gateway's own protocols: :class:`~aiwfe.plugins.gateway.front.Front`
first (a WebSocket handshake that arrives whole goes straight to the WebSocket protocol),
:class:`LeanHttp` for everything else (httptools, since h11's pure-Python parser was ≈ 15 %
of the gateway's CPU in a handshake burst) and :mod:`~aiwfe.plugins.gateway.wsproto` for
WebSockets, run as ``uvicorn.Server.serve(sockets=[...])`` on a socket this module binds
itself:

* port 0 gives the exact bound port at once (no probe-then-bind race), which is what
  ``public_url`` and ``aiwfe up`` print;
* its WebSocket protocol enforces ``ws_max_size`` (close 1009 before an oversized frame is
  buffered in full), sends keepalive pings and applies write backpressure (``send`` waits
  while the transport is paused, which is what makes the per-socket queue meaningful);
* it never touches the pod's signal handlers (``capture_signals`` is disabled here).

**Logging.** The pod's CLI configures logging once; the servers must not do it again (a
second format). uvicorn gets ``log_config=None`` (no ``dictConfig``: it only sets the levels
of its own ``uvicorn.*`` loggers to warning, which propagate to the pod's handlers) and
``access_log=True`` (with ``False`` it would empty ``uvicorn.access``'s handlers and stop
its propagation; at level warning no access line is written, and the level check costs
≈ 0.75 µs per HTTP response). Granian always calls ``dictConfig``, so it gets an
*incremental* one (:func:`granian_log_config`) that only sets the level of its
``_granian`` logger. ``tests/unit/test_gateway_logging.py``
checks that no logger gains or loses a handler.

**Decision: Granian is shipped, as an option** (``server = "granian"``, install extra
``aiwfe[granian]``, part of ``dev``). It installs from the registry as a binary wheel
(granian 2.8.9 tested), :class:`EmbeddedGranian` runs it on ``granian.server.embed``,
``tests/unit/test_gateway_granian.py`` runs the gateway's WebSocket behaviours against
it, and ``aiwfe bench ws`` / ``auth-burst`` compare the two servers with
``--server granian``. It stays the non-default because its embedded server, marked
experimental by its authors, binds by host/port (port 0 is resolved beforehand, a small
race), has no WebSocket message-size limit or protocol pings of its own (only the
gateway's frame check after the frame was buffered, and the idle timeout), and does its
socket I/O in Rust threads.

Measured on the 2-core development machine (load generator, NATS and the other pod on the
same cores; ``aiwfe bench ws`` and ``aiwfe bench auth-burst``):

* through the gateway (``call`` frame → NATS → perception pod → back), uvicorn: 1,000
  sockets × 1 msg/s p99 ≈ 2.4 ms, 5,000 sockets p99 ≈ 21 ms (bare echo 0.7 / 1.4 ms).
  Before the direct paths (:mod:`~aiwfe.plugins.gateway.wsproto`), the pod's garbage-collector thresholds (``kernel.pod``) and
  the perception plugin's trigram cache, 5,000 sockets saturated the gateway (p99 ≈ 2 s);
* 2,000 handshakes with token checks plus 200 logins offered within one second: connect
  p99 71–291 ms with one gateway process, depending on what else the machine runs (its
  event loop is saturated during the burst); two replicas on one port (``reuse_port``):
  median 173 ms over five runs;
* Granian (before those changes): bare echo at 1,000 sockets p99 ≈ 48 ms against
  uvicorn's 1–4 ms; faster handshakes (2,000 in a second against a bare echo: p99 ≈ 130 ms
  vs 235 ms with h11).

uvicorn stays the default for the protocol-level frame limit, keepalive pings, write
backpressure and the exact port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .front import Front
from .wsproto import LeanWs
from .wswire import json_answer

__all__ = ["EmbeddedGranian", "EmbeddedServer", "LeanHttp", "bind_socket", "granian_log_config"]

log = logging.getLogger("aiwfe.gateway.server")


def granian_log_config() -> dict[str, Any]:
    """Granian's logging config: incremental (no handler, formatter or root change) and
    without its own handlers; Granian adds the level of its ``_granian`` logger to it
    (a fresh dict each time, since Granian writes into it)."""
    return {"version": 1, "incremental": True, "formatters": {}, "handlers": {}, "loggers": {}}


def bind_socket(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> socket.socket:
    """Bind and listen on ``host:port`` (0 = a free port); return the socket.

    ``reuse_port``: ``SO_REUSEPORT``, so that other processes may bind the same port.

    Raises:
        OSError: the address is taken or not available.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio's transport
    # turns Nagle's algorithm off (TCP_NODELAY) only for sockets whose proto says TCP. With
    # proto 0 every small frame written while an earlier one was unacknowledged waited for
    # the client's delayed ACK: a job's first event reached the client ≈ 40 ms late.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LeanHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounding request heads and upgrading to :class:`LeanWs`
    without a second parse (see the module doc); bytes read with the upgrade request, after
    its head, go to the :class:`LeanWs` (frames a client sent without waiting for the 101).

    The head count starts again with each request. A pipelined request that begins in the
    read in which the previous one ends is counted from its next read on: its head may
    exceed the limit by that one read (asyncio reads at most 256 KiB), a bounded overshoot
    kept so that no request pays for counting header by header.

    A client has :attr:`request_read_s` to send a whole request, head and body, counted from
    its connect or from the first byte of the request: past it 408 (the connection closed; a
    response already under way is cut). uvicorn itself has no such timer, so a client that
    connected and sent nothing, half a head or half a body held its socket for ever. The
    time between requests is uvicorn's keep-alive timeout; an upgraded WebSocket has its own
    pings and idle timeout.

    A response the client does not read (writing paused for :attr:`write_stall_s` on end)
    aborts the connection. uvicorn's ``send`` waits for a paused transport for ever:
    an event stream to a client that kept its socket but stopped reading held its task and
    JetStream consumer as long as the client liked (tests/integration/test_gateway_leaks.py)."""

    #: Seconds to send one whole request (head and body); past it 408.
    request_read_s = 30.0
    #: Seconds a response may wait, writing paused, for a client that does not read; past it the connection is aborted.
    write_stall_s = 30.0

    #: Largest request head (request line and headers, their CRLFs and the blank line, bytes); past it 431 at once.
    max_header_bytes = 16_384
    #: Largest single line of a request head (bytes before its LF: the CR counts); past it 431 at once.
    max_line_bytes = 8_192
    _head_open = True
    _head_bytes = 0
    _line_bytes = 0  # the current head line's bytes so far (a line may span reads)
    _tail = b""  # the last bytes of the previous read (a head's end may span reads)
    _read_timer: asyncio.TimerHandle | None = None  # armed while a request is being read
    _stall_timer: asyncio.TimerHandle | None = None  # armed while writing is paused

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer = self.loop.call_later(self.request_read_s, self._read_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unstall()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.write_stall_s, self._write_stalled)

    def resume_writing(self) -> None:
        self._unstall()
        super().resume_writing()

    def _unstall(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _write_stalled(self) -> None:
        self._stall_timer = None
        log.info("http %s: the client read nothing for %g s; connection aborted", self.client, self.write_stall_s)
        self.transport.abort()

    def keep_deadline(self, deadline: float) -> None:
        """Count the first request's time from ``deadline - request_read_s`` (loop time), the
        connect that :class:`~aiwfe.plugins.gateway.front.Front` saw, not the hand-over."""
        self._disarm()
        self._read_timer = self.loop.call_at(deadline, self._read_timeout)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timeout(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle  # the request being read, or (its head not read yet) the one before
        if cycle is None or cycle.response_complete or not cycle.response_started:
            self.transport.write(self.timeout_answer())
        self.transport.close()

    @classmethod
    def timeout_answer(cls) -> bytes:
        """The 408 for a request not sent within :attr:`request_read_s`."""
        return json_answer(408, f"the request was not sent within {cls.request_read_s:g} s")

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            if self._read_timer is None:  # a new request begins
                self._read_timer = self.loop.call_later(self.request_read_s, self._read_timeout)
            if self._head_too_big(data):
                self._head_open = False
                self._disarm()
                self.transport.write(json_answer(431, "request headers too large"))
                self.transport.close()
                return
        # uvicorn's data_received, keeping what follows an upgrade request's head
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.logger.warning("Invalid HTTP request received.")
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as upgrade:
            if self._should_upgrade():
                self._upgrade(data[upgrade.args[0] :])
            else:
                self._unsupported_upgrade_warning()

    def _head_too_big(self, data: bytes) -> bool:
        """Count the head's bytes in ``data`` (not a body that follows it in the same read)."""
        probe = self._tail + data
        end = probe.find(b"\r\n\r\n")
        head = data if end < 0 else data[: max(0, end + 4 - len(self._tail))]
        self._tail = probe[-3:]
        self._head_bytes += len(head)
        lines = head.split(b"\n")
        longest = max(self._line_bytes + len(lines[0]), *map(len, lines[1:])) if len(lines) > 1 else 0
        self._line_bytes = len(lines[-1]) if len(lines) > 1 else self._line_bytes + len(head)
        return self._head_bytes > self.max_header_bytes or max(longest, self._line_bytes) > self.max_line_bytes

    def on_headers_complete(self) -> None:
        self._head_open = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()  # read whole: what remains is the app's to answer
        super().on_message_complete()
        self._head_open, self._head_bytes, self._line_bytes, self._tail = True, 0, 0, b""  # the next request

    def handle_websocket_upgrade(self) -> None:
        self._upgrade(b"")

    def _upgrade(self, rest: bytes) -> None:
        self._disarm()
        self.connections.discard(self)
        proto = LeanWs(self.config, self.server_state, self.app_state, dict(self.scope), self.url)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if rest:
            proto.data_received(rest)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The pod owns SIGTERM/SIGINT (drain order); the embedded server must not take them.
        yield


class EmbeddedServer:
    """An ASGI app served by uvicorn as a task of the running loop.

    ``start`` binds and returns when the server accepts connections; ``stop`` closes it.
    """

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        max_frame_bytes: int,
        ping_interval_s: float,
        ping_timeout_s: float,
        backlog: int = 4096,
        graceful_s: float = 5.0,
        keep_alive_s: float = 75.0,
        reuse_port: bool = False,
        max_header_bytes: int = 16_384,
    ) -> None:
        self.host = host
        self.port = port
        self.backlog = backlog
        self.reuse_port = reuse_port
        http = type("LeanHttp", (LeanHttp,), {"max_header_bytes": max_header_bytes})
        self.config = uvicorn.Config(
            app,
            lifespan="off",
            http=type("Front", (Front,), {"http": http}),
            ws=LeanWs,
            ws_max_size=max_frame_bytes,
            ws_ping_interval=ping_interval_s if ping_interval_s > 0 else None,
            ws_ping_timeout=ping_timeout_s if ping_timeout_s > 0 else None,
            log_config=None,  # the pod configured logging (see the module doc)
            log_level="warning",
            access_log=True,  # False would clear uvicorn.access's handlers; at warning nothing is logged
            backlog=backlog,
            timeout_keep_alive=int(max(1, keep_alive_s)),
            timeout_graceful_shutdown=int(max(1, graceful_s)),
            loop="none",
            proxy_headers=False,  # X-Forwarded-For would choose the address the login throttle counts (uvicorn trusts loopback)
        )
        self.server = _Server(self.config)
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def bound_port(self) -> int:
        """The port actually bound (after :meth:`start`)."""
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        """Bind and serve; return once the server accepts connections.

        Raises:
            OSError: the address could not be bound.
            RuntimeError: the server stopped while starting.
        """
        self.sock = bind_socket(self.host, self.port, self.backlog, reuse_port=self.reuse_port)
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                exc = self.task.exception()
                raise RuntimeError(f"gateway server did not start: {exc!r}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (bounded), close the socket."""
        if self.task is not None:
            self.server.should_exit = True
            try:
                async with asyncio.timeout(self.config.timeout_graceful_shutdown or 5):
                    await asyncio.shield(self.task)
            except TimeoutError:
                self.server.force_exit = True
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
        if self.sock is not None:
            self.sock.close()


class EmbeddedGranian:
    """The same interface on Granian's embedded server (``aiwfe[granian]``; see the module doc).

    Granian binds by address and port itself, so port 0 is resolved to a port that was
    free a moment before (a small race). It has no WebSocket message-size limit or
    protocol pings of its own: the gateway's own frame check and idle timeout apply.
    Its warnings go to the pod's handlers (logger ``_granian``, level warning).

    Raises:
        ImportError: granian is not installed (``pip install 'aiwfe[granian]'``).
    """

    def __init__(self, app: Any, *, host: str, port: int, backlog: int = 4096, **_: Any) -> None:
        from granian.constants import Interfaces
        from granian.log import LogLevels
        from granian.server.embed import Server

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
        self.port = port
        self.server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGINL,
            websockets=True,
            backlog=backlog,
            log_level=LogLevels.warning,
            log_dictconfig=granian_log_config(),
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def bound_port(self) -> int:
        """The port served."""
        return self.port

    async def start(self) -> None:
        """Serve; return once the port accepts connections.

        Raises:
            RuntimeError: the server stopped while starting.
        """
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        host = self.server.bind_addr
        while True:
            if self.task.done():
                raise RuntimeError(f"gateway server did not start: {self.task.exception()!r}")
            try:
                _, w = await asyncio.open_connection(host, self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop the server and wait for it (bounded)."""
        if self.task is not None:
            self.server.stop()
            try:
                async with asyncio.timeout(10):
                    await asyncio.shield(self.task)
            except TimeoutError:
                self.task.cancel()
