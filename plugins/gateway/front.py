"""The first protocol of every gateway connection: a WebSocket handshake that arrives whole in
the connection's first read is handed to :class:`~aiwfe.plugins.gateway.wsproto.LeanWs`
at once; everything else goes to :class:`~aiwfe.plugins.gateway.server.LeanHttp` (uvicorn's
httptools protocol) with the bytes read so far.

Why: a handshake through uvicorn's HTTP protocol first built a per-connection httptools
parser, asked the socket for both addresses again (two system calls; asyncio already has
them), ran a Python callback per header and built an HTTP scope, only to hand the request to
the WebSocket protocol. That was a fifth of the gateway's CPU per connect in a handshake
burst (``aiwfe bench auth-burst``; PERFORMANCE.md "Fifth pass").

**The fast path is taken only for a head that is plainly valid**, so that it never accepts
what the HTTP path would refuse and never refuses what it would accept (it refuses
nothing: whatever it does not take goes to :class:`LeanHttp` unchanged):

* the head ends in the first read and is at most ``min(max_header_bytes, max_line_bytes)``
  bytes, so no limit of :class:`LeanHttp` can apply to it;
* it matches ``GET <visible ASCII> HTTP/1.1`` and lines of ``token ":" value`` whose values
  hold no control character but tab (no folded line, no bare CR or LF);
* exactly one ``Connection`` header, whose comma-separated tokens include ``upgrade``, and
  exactly one ``Upgrade`` header, ``websocket`` (as uvicorn decides an upgrade); no
  ``Content-Length`` or ``Transfer-Encoding``.

The WebSocket checks themselves (key, version, ``Host``, the target) are
:func:`~aiwfe.plugins.gateway.wswire.handshake`'s, as on the HTTP path. Header names are
lower-cased and values stripped of surrounding blanks, as uvicorn gives them.

Until its first byte a connection is the front's: a client that sends nothing within
``LeanHttp.request_read_s`` gets 408 and is closed; a request handed over keeps the time
left from the connect. At server shutdown an idle connection is closed.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from .wsproto import LeanWs

__all__ = ["Front"]

# The request line and header lines of a plainly valid GET head (see the module doc).
_HEAD = re.compile(
    rb"GET [!-~]+ HTTP/1\.1\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*\r\n"
)


class Front(asyncio.Protocol):
    """One connection until its first read (see the module doc). :attr:`http` is the
    :class:`~aiwfe.plugins.gateway.server.LeanHttp` class requests are handed to (set by
    ``EmbeddedServer``, which subclasses this one)."""

    __slots__ = ("_deadline", "_timer", "app_state", "config", "server_state", "transport")

    http: Any  # type[LeanHttp]: not imported, server.py imports this module

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], _loop: Any = None) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.http.request_read_s
        self._timer = loop.call_at(self._deadline, self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def eof_received(self) -> None:
        return None  # close the transport

    def shutdown(self) -> None:
        """Server shutdown: nothing was read yet, so nothing is answered."""
        self._leave()
        self.transport.close()

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server_state.connections.discard(self)

    def _timeout(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self.transport.write(self.http.timeout_answer())
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._leave()
        scope = self._websocket_head(data)
        if scope is None:
            self._hand_over(data)
            return
        http, url, end = scope
        proto = LeanWs(self.config, self.server_state, self.app_state, http, url)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if end < len(data):
            proto.data_received(data[end:])

    def _websocket_head(self, data: bytes) -> tuple[dict[str, Any], bytes, int] | None:
        """The HTTP scope, target and head length of a plainly valid upgrade head, else None."""
        if not data.startswith(b"GET "):
            return None
        end = data.find(b"\r\n\r\n")
        http_cls = self.http
        if end < 0 or end + 4 > min(http_cls.max_header_bytes, http_cls.max_line_bytes):
            return None
        end += 4
        if _HEAD.fullmatch(data, 0, end) is None:
            return None
        lines = data[:end].split(b"\r\n")
        headers: list[tuple[bytes, bytes]] = []
        connection = upgrade = None
        seen_connection = seen_upgrade = 0
        for line in lines[1:-2]:
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"connection":
                connection, seen_connection = value, seen_connection + 1
            elif name == b"upgrade":
                upgrade, seen_upgrade = value, seen_upgrade + 1
            elif name == b"content-length" or name == b"transfer-encoding":
                return None
            headers.append((name, value))
        if seen_connection != 1 or seen_upgrade != 1 or upgrade is None or upgrade.lower() != b"websocket":
            return None
        assert connection is not None
        if b"upgrade" not in (t.strip() for t in connection.lower().split(b",")):
            return None
        peer = self.transport.get_extra_info("peername")
        local = self.transport.get_extra_info("sockname")
        http = {
            "method": "GET",
            "headers": headers,
            "server": (str(local[0]), int(local[1])) if isinstance(local, tuple) else None,
            "client": (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) else None,
            "state": self.app_state.copy(),
        }
        return http, lines[0][4:-9], end  # the target: "GET <target> HTTP/1.1"

    def _hand_over(self, data: bytes) -> None:
        """Give the connection to :attr:`http`, with the bytes read and the time left."""
        proto = self.http(config=self.config, server_state=self.server_state, app_state=self.app_state)
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        proto.keep_deadline(self._deadline)
        proto.data_received(data)
