"""The ops HTTP endpoint every pod serves: ``/health``, ``/ready``, ``/metrics``.

A few dozen lines of asyncio rather than a framework: it must answer while the pod is
still connecting to NATS or draining, and it must cost nothing on pods without a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from . import metrics


def overdue(kernel: Any) -> list[tuple[str, int, int]]:
    """``(address, stuck, concurrency)`` of every handler of ``kernel`` (an
    :class:`aiwfe.kernel.routing.Kernel`) with invocations still running past their deadline
    (:func:`aiwfe.kernel.metrics.stuck`)."""
    eps = [*kernel.endpoints.values(), *kernel.job_endpoints.values(), *(e for v in kernel.events.values() for e in v)]
    return [(ep.spec.address, n, ep.limiter.limit) for ep in eps if (n := metrics.stuck(ep))]


def stuck_handlers(kernel: Any, *, all_slots: bool) -> list[str]:
    """Readiness reasons (``all_slots``: handlers whose every slot is held by work stuck past
    its deadline) or degraded notes (handlers with some slots held that way)."""
    return [
        f"{address}: all {limit} slots held by handlers stuck past their deadline"
        if all_slots
        else f"{address}: {stuck} of {limit} slots held by handlers stuck past their deadline"
        for address, stuck, limit in overdue(kernel)
        if (stuck >= limit) == all_slots
    ]


def plugin_details(plugins: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What each plugin says it runs (e.g. memory's ``{"embedder": "hashing"}``), from its
    optional ``details() -> dict`` method; plugins with nothing to say are left out."""
    out = {}
    for name, plugin in plugins.items():
        details = getattr(plugin, "details", None)
        if callable(details) and (d := details()):
            out[name] = d
    return out


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class OpsServer:
    """Serves health (process alive), readiness (``ready()`` returns no reasons; a degraded
    pod is still ready and lists ``degraded()`` notes; ``details()`` says what each plugin
    runs, e.g. ``{"memory": {"embedder": "hashing"}}``) and metrics."""

    def __init__(
        self,
        pod: str,
        ready: Callable[[], list[str]],
        host: str = "127.0.0.1",
        port: int = 0,
        degraded: Callable[[], list[str]] = list,
        details: Callable[[], dict[str, Any]] = dict,
    ) -> None:
        self.pod = pod
        self.ready = ready
        self.degraded = degraded
        self.details = details
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Listen; ``port`` 0 picks a free port (read it back from ``self.port``)."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        """Base URL of the ops endpoint."""
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            ctype = "application/json"
            if method not in ("GET", "HEAD"):
                status, body = 405, b'{"error":"method not allowed"}'
            elif path == "/health":
                status, body = 200, json.dumps({"status": "ok", "pod": self.pod}).encode()
            elif path == "/ready":
                reasons = self.ready()
                status = 503 if reasons else 200
                body = json.dumps(
                    {
                        "ready": not reasons,
                        "pod": self.pod,
                        "reasons": reasons,
                        "degraded": self.degraded(),
                        "plugins": self.details(),
                    }
                ).encode()
            elif path == "/metrics":
                status, body, ctype = 200, metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
            else:
                status, body = 404, b'{"error":"not found"}'
            head = (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
