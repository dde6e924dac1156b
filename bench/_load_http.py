"""A minimal HTTP/1.1 keep-alive client for load generation: one connection per simulated user.

httpx's ``AsyncClient`` costs several milliseconds of CPU per request with hundreds of users
sharing its pool (measured by ``aiwfe loadtest --http-client httpx``: ~5.8 ms/request at
500 users), which on a 2-core machine inflates the latencies being measured and starves the
server. Like :class:`bench.ws.RawWs` this client does the framing with a few ``bytes``
operations; it understands ``Content-Length`` and chunked bodies, and reconnects once when the
server closed an idle keep-alive connection before the request was answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import urlsplit

__all__ = ["RawHttp", "RawResponse"]


class RawResponse:
    """Status, lower-cased headers and body of one response."""

    __slots__ = ("body", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            ValueError: not JSON.
        """
        return json.loads(self.body)


class RawHttp:
    """One keep-alive connection to ``base_url`` (``http://host:port``)."""

    def __init__(self, base_url: str) -> None:
        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        """Drop the connection (a new request opens another)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._reader = self._writer = None

    async def request(
        self, method: str, path: str, *, json_body: Any = None, headers: dict[str, str] | None = None, timeout_s: float = 30.0
    ) -> RawResponse:
        """Send one request and read its response.

        Raises:
            TimeoutError: no complete response within ``timeout_s`` (the connection is dropped);
            OSError, asyncio.IncompleteReadError: the connection failed.
        """
        body = b"" if json_body is None else json.dumps(json_body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        ctype = "Content-Type: application/json\r\n" if json_body is not None else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{ctype}Content-Length: {len(body)}\r\n{extra}\r\n"
        data = head.encode() + body
        try:
            async with asyncio.timeout(timeout_s):
                reused = self._writer is not None and self._reader is not None and not self._reader.at_eof()
                if not reused:
                    self.close()
                    await self._connect()
                try:
                    return await self._exchange(data)
                except (asyncio.IncompleteReadError, ConnectionError) as e:
                    partial = isinstance(e, asyncio.IncompleteReadError) and e.partial
                    if not reused or partial:
                        raise
                    # The server closed the idle connection as we wrote: send again on a new one.
                    self.close()
                    await self._connect()
                    return await self._exchange(data)
        except BaseException:
            self.close()
            raise

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def _exchange(self, data: bytes) -> RawResponse:
        """Write one request and read its response on the open connection."""
        assert self._reader is not None and self._writer is not None
        self._writer.write(data)
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body = await self._reader.readexactly(n) if n else b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                chunk = await self._reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(chunk[:-2])
            body = b"".join(parts)
        else:
            body = await self._reader.read()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return RawResponse(status, headers, body)
