"""The gateway's WebSocket protocol for uvicorn: the handshake and RFC 6455 frames in one
small class, with no second parse of the request.

uvicorn's own WebSocket protocols get the upgrade request as bytes again, re-serialised
from what its HTTP parser already read, and parse it a second time (websockets' Python
generator parser), build a response object, and run every frame through websockets'
parser. With this protocol instead, 5,000 handshakes with token checks offered in one
second against two gateway processes went from p99 661–920 ms to 230–540 ms, and with
200 logins in the same second from 1,039–1,381 ms to 617–648 ms (``aiwfe bench
auth-burst``, old and new code alternating; PERFORMANCE.md "Fourth pass").

:class:`~aiwfe.plugins.gateway.front.Front` (a handshake that arrived whole) or
:class:`~aiwfe.plugins.gateway.server.LeanHttp` (any other) hands it the request it parsed.

:class:`LeanWs` serves the ASGI WebSocket interface (``websocket.accept``/``send``/
``close``, the ``websocket.http.response`` denial extension, ``receive``) and, for the
gateway's connections, two direct paths: :attr:`LeanWs.on_message` (each client message
by a plain call, no queue) and :meth:`LeanWs.write_text_nowait`. What it enforces:

* the handshake (:func:`~aiwfe.plugins.gateway.wswire.handshake`): else 400 or 426; frames
  sent with the request wait for the 101 (dropped when refused);
* frames: masked, RSV bits clear, known opcodes, lengths under 2⁶³, control frames final and
  ≤ 125 bytes, continuations only inside a fragmented message (else close 1002); a message
  over ``ws_max_size`` closes 1009 before it is buffered; a text message that is not UTF-8
  closes 1007; a close frame as :func:`~aiwfe.plugins.gateway.wswire.parse_close` says;
* keepalive: a ping every ``ws_ping_interval``; no matching pong within
  ``ws_ping_timeout`` closes the connection (1011);
* backpressure: ``send`` waits while the transport's write buffer is over its mark (and
  only the client's last ping is answered, once it is not);
  reading pauses while :attr:`LeanWs.high_water` messages wait for the app's ``receive``;
* close: a client's close frame is answered with the same code and the socket closed;
  after the app's close, the client has ``close_timeout_s`` to answer before the socket
  is aborted, as is a closed socket that cannot flush (the client does not read) after
  ``close_timeout_s``; server shutdown sends 1012 (aborts a socket that cannot take it).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from uvicorn.protocols.utils import ClientDisconnected, is_ssl

from . import wswire
from .wswire import ProtocolError, apply_mask, close_frame, frame_bytes, http_response

__all__ = ["LeanWs"]

log = logging.getLogger("aiwfe.gateway.ws")


class LeanWs(asyncio.Protocol):
    """One WebSocket connection of uvicorn's server (see the module doc)."""

    #: Messages waiting for ``receive`` before reading pauses (the app drains them: resumed).
    high_water = 16
    #: Seconds the client has to answer the server's close frame.
    close_timeout_s = 10.0

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], http_scope: dict[str, Any], url: bytes) -> None:
        self.config = config
        self.app = config.loaded_app
        self.loop = asyncio.get_running_loop()
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers: list[tuple[bytes, bytes]] = server_state.default_headers
        self.max_size: int | None = config.ws_max_size
        self.ping_interval: float | None = config.ws_ping_interval
        self.ping_timeout: float | None = config.ws_ping_timeout
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.handshake_complete = False
        self.close_sent = False
        self.disconnected = False
        self.read_paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        #: Set by the app: called with each message's bytes and whether it is text, in place of
        #: queueing it for ``receive`` (the text is not checked for UTF-8: the callee does it).
        self.on_message: Any = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._accepted = False  # frames are parsed only after the 101 went out (before: kept)
        self._buf: list[bytes] | None = None  # the bytes of an unfinished frame, as read
        self._have = 0  # their length
        self._need = 0  # the length of the frame they start, when known (else 0)
        self._pong: bytes | None = None  # a ping's payload, to answer when writing resumes
        self._frags: list[bytes] | None = None  # a fragmented message's parts so far
        self._frag_text = False
        self._frag_size = 0
        self._denial: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._ping_payload: bytes | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.scope, self._accept, self._refusal = wswire.handshake(http_scope, url, config.root_path)

    # -- transport events ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        if is_ssl(self.transport):
            self.scope["scheme"] = "wss"
        if self._refusal is not None:
            status, body, headers = self._refusal
            self._answer(http_response(status, headers, body))
            return
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self._run_asgi())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.disconnected:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1005 if self.handshake_complete else 1006})
        self.connections.discard(self)
        self.handshake_complete = self.disconnected = True
        self.writable.set()  # a transport lost while paused never resumes writing

    def eof_received(self) -> None:
        return None  # close the transport

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()
        if self._pong is not None and not self.close_sent:
            self.transport.write(frame_bytes(0x8A, self._pong))
        self._pong = None

    def shutdown(self) -> None:
        """Server shutdown: close 1012 (service restart), or 500 before the handshake; the app
        hears the disconnect (1012, or 1006 before the handshake) and its sends raise
        ``ClientDisconnected``. A client whose socket holds back our writes is aborted."""
        self._stop_keepalive()
        if not self.handshake_complete:
            self._answer(http_response(500, [], b"server shutting down\n"))
            return
        if self._denial is None and not self.close_sent:
            self.transport.write(close_frame(1012, "server shutting down"))
        if not self.disconnected:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1012})
        self.close_sent = self.disconnected = True
        if self.writable.is_set():
            self._close()
        else:  # the client does not read: the close frame would not reach it
            self.transport.abort()

    def _close(self) -> None:
        """Close the transport; abort it after ``close_timeout_s`` if it cannot flush by then."""
        self.transport.close()
        if self._close_timer is None and self.transport.get_write_buffer_size():
            self._close_timer = self.loop.call_later(self.close_timeout_s, self.transport.abort)

    # -- frames ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._accepted:
            self._early(data)
            return
        if self._buf is None:
            buf = data
        else:  # the rest of a frame: joined once it is all here, not again at each read
            self._buf.append(data)
            self._have += len(data)
            if self._have < self._need:
                return
            buf = b"".join(self._buf)
            self._buf = None
        size = len(buf)
        pos = need = 0
        max_size = self.max_size
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70 or not b1 & 0x80:
                self._fail(1002, "unmasked frame or reserved bits set")
                return
            op = b0 & 0x0F
            n = b1 & 0x7F
            head = pos + 2
            if n == 126:
                if size - pos < 4:
                    break
                n = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[head : head + 8], "big")
                head += 8
                if n >> 63:
                    self._fail(1002, "frame length with its top bit set")
                    return
            if op >= 8 and (n > 125 or not b0 & 0x80):
                self._fail(1002, "control frame fragmented or over 125 bytes")
                return
            if op < 8 and max_size is not None and n + (self._frag_size if op == 0 else 0) > max_size:
                self._fail(1009 if op < 3 else 1002, f"message over {max_size} bytes" if op < 3 else f"unknown opcode {op}")
                return
            end = head + 4 + n
            if end > size:
                need = end - pos
                break
            payload = apply_mask(buf[head + 4 : end], buf[head : head + 4]) if n else b""
            pos = end
            if not self._frame(b0 & 0x80, op, payload) or self.transport.is_closing():
                return
        if pos < size:
            self._buf, self._have, self._need = [buf[pos:] if pos else buf], size - pos, need

    def _early(self, data: bytes) -> None:
        """Bytes before the 101 (a client must wait for it): kept for after it, reading paused
        past 64 KiB; dropped once the upgrade was refused."""
        if self.close_sent:
            return
        if self._buf is None:
            self._buf, self._have = [], 0
        self._buf.append(data)
        self._have += len(data)
        if self._have > 65_536 and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _frame(self, fin: int, op: int, payload: bytes) -> bool:
        """Handle one frame; False when it failed the connection."""
        if op == 1 or op == 2:
            if self._frags is not None:
                return self._fail(1002, "a new message inside a fragmented one")
            if fin:
                self._deliver(payload, op == 1)
            else:
                self._frags, self._frag_text, self._frag_size = [payload], op == 1, len(payload)
        elif op == 0:
            if self._frags is None:
                return self._fail(1002, "continuation frame outside a message")
            self._frags.append(payload)
            self._frag_size += len(payload)
            if fin:
                data = b"".join(self._frags)
                self._frags, self._frag_size = None, 0
                self._deliver(data, self._frag_text)
        elif op == 8:
            try:
                self._on_close(*wswire.parse_close(payload))
            except ProtocolError as e:
                return self._fail(e.code, str(e))
        elif op == 9:
            if not self.writable.is_set():  # the client does not read: only its last ping is answered, on resume
                self._pong = payload
            elif not self.close_sent:
                self.transport.write(frame_bytes(0x8A, payload))
        elif op == 10:
            if self._ping_payload is not None and payload == self._ping_payload:
                self._ping_payload = None
                if self._pong_timer is not None:
                    self._pong_timer.cancel()
                    self._pong_timer = None
                self._schedule_ping()
        else:
            return self._fail(1002, f"unknown opcode {op}")
        return True

    def _deliver(self, data: bytes, text: bool) -> None:
        if self.close_sent:
            return  # the app is past its close: reading goes on only for the client's close
        handler = self.on_message
        if handler is not None:
            handler(data, text)
            return
        if text:
            try:
                message: dict[str, Any] = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError:
                self._fail(1007, "text message is not UTF-8")
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self.queue.put_nowait(message)
        if not self.read_paused and self.queue.qsize() >= self.high_water:
            self.read_paused = True
            self.transport.pause_reading()

    def _on_close(self, code: int, reason: str) -> None:
        if self.close_sent:  # the client answered our close: the closing handshake is done
            self._close()
            return
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.disconnected = True
        self.close_sent = True
        self.transport.write(close_frame(None if code == 1005 else code))
        self._close()

    def _fail(self, code: int, reason: str) -> bool:
        log.debug("ws %s: closing %d: %s", self.scope.get("client"), code, reason)
        if not self.close_sent:
            self.transport.write(close_frame(code, reason))
            self.close_sent = True
        if not self.disconnected:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.disconnected = True
        self._close()
        return False

    # -- keepalive ------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        if self.ping_interval:
            self._ping_timer = self.loop.call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self.close_sent or self.transport.is_closing():
            return
        self._ping_payload = os.urandom(4)
        self.transport.write(frame_bytes(0x89, self._ping_payload))
        if self.ping_timeout:
            self._pong_timer = self.loop.call_later(self.ping_timeout, self._fail, 1011, "keepalive ping timeout")
        else:
            self._schedule_ping()

    def _stop_keepalive(self) -> None:
        for timer in (self._ping_timer, self._pong_timer):
            if timer is not None:
                timer.cancel()
        self._ping_timer = self._pong_timer = None

    # -- ASGI ------------------------------------------------------------------------------

    async def _run_asgi(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            log.exception("ws %s: exception in the ASGI application", self.scope.get("path"))
            if not self.handshake_complete:
                self._answer(http_response(500, [], b"internal server error\n"))
        else:
            if not self.handshake_complete:
                log.error("ws %s: the ASGI application returned without completing the handshake", self.scope.get("path"))
                self._answer(http_response(500, [], b"internal server error\n"))
        if self._close_timer is None:
            self._close()

    def _answer(self, response: bytes) -> None:
        """An HTTP answer in place of the upgrade; the connection ends."""
        if not self.disconnected:
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        self.handshake_complete = self.close_sent = self.disconnected = True
        self._buf = None  # frames sent before the answer: never read
        if not self.transport.is_closing():
            self.transport.write(response)
            self._close()

    async def receive(self) -> dict[str, Any]:
        """ASGI ``receive``: the connect event, then messages, then the disconnect."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        """ASGI ``send`` (see the module doc).

        Raises:
            ClientDisconnected: the connection is gone.
            RuntimeError: a message the ASGI WebSocket interface does not allow now.
        """
        await self.writable.wait()
        if self.disconnected and self._denial is None:
            raise ClientDisconnected()
        kind = message["type"]
        if not self.handshake_complete:
            if kind == "websocket.accept":
                self._accept_now(message)
            elif kind == "websocket.close":
                self._answer(http_response(403, [], b""))
            elif kind == "websocket.http.response.start":
                status = message["status"]
                if not 100 <= status < 600:
                    raise RuntimeError(f"invalid HTTP status {status} in a WebSocket denial response")
                self._denial = (status, list(message.get("headers", [])), b"")
                self.handshake_complete = True
            else:
                raise RuntimeError(f"expected websocket.accept, websocket.close or websocket.http.response.start, got {kind}")
        elif self._denial is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected websocket.http.response.body, got {kind}")
            status, headers, body = self._denial
            body += message.get("body", b"")
            self._denial = (status, headers, body)
            if not message.get("more_body", False):
                self._denial = None
                self.handshake_complete = False
                self._answer(http_response(status, headers, body))
        elif self.close_sent:
            raise RuntimeError(f"unexpected ASGI message {kind} after websocket.close")
        elif kind == "websocket.send":
            data = message.get("bytes")
            if data is not None:
                self.transport.write(frame_bytes(0x82, data))
            else:
                self.transport.write(frame_bytes(0x81, message.get("text", "").encode()))
        elif kind == "websocket.close":
            code = message.get("code", 1000)
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": message.get("reason") or ""})
            self.disconnected = True
            self.transport.write(close_frame(code, message.get("reason") or ""))
            self.close_sent = True
            self._stop_keepalive()
            if self.read_paused:
                self.read_paused = False
                self.transport.resume_reading()
            self._close_timer = self.loop.call_later(self.close_timeout_s, self.transport.abort)
        else:
            raise RuntimeError(f"expected websocket.send or websocket.close, got {kind}")

    def _accept_now(self, message: dict[str, Any]) -> None:
        if self.transport.is_closing():
            return
        response = wswire.switching_response(
            self._accept, message.get("subprotocol"), (*self.default_headers, *message.get("headers", ()))
        )
        self.handshake_complete = self._accepted = True
        self.transport.write(response)
        self._schedule_ping()
        if self._buf is not None:  # frames sent with the request, before the 101
            self.data_received(b"")
            if self.read_paused and self.queue.qsize() < self.high_water and not self.transport.is_closing():
                self.read_paused = False
                self.transport.resume_reading()

    def write_text_nowait(self, text: bytes) -> bool:
        """Write one text frame (UTF-8 ``text``) now if the transport takes it without waiting;
        False when the caller must go through ``send`` (handshake pending, closing, or writing
        paused by backpressure)."""
        if self.close_sent or self.disconnected or not self.handshake_complete or not self.writable.is_set():
            return False
        self.transport.write(frame_bytes(0x81, text))
        return True
