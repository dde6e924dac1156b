"""The gateway plugin: Litestar HTTP + WebSocket + console, served inside the pod's loop.

It owns no contract of its own: it calls ``auth.*`` (register, login, verify, logout),
the request contracts listed in ``ws_calls`` (WebSocket ``call`` frames), submits jobs
as JSON by address (``job_kinds``), and listens to ``auth.revoked`` to close revoked
tokens' sockets with 4001. See :mod:`plugins.gateway.app` for the HTTP surface and
:mod:`plugins.gateway.ws` for the WebSocket protocol.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from aiwfe.kernel import Plugin, serves
from aiwfe.kernel.contract import address_of
from aiwfe.kernel.errors import ConfigError
from aiwfe.plugins.auth.contract import Claims, Login, Logout, Register, TokenRevoked, Verify
from aiwfe.plugins.memory.contract import Recall, Remember
from aiwfe.plugins.perception.contract import Perceive

from .app import build_asgi
from .server import EmbeddedGranian, EmbeddedServer
from .ws import Hub

__all__ = ["GatewayPlugin"]

log = logging.getLogger("aiwfe.gateway")


class GatewayPlugin(Plugin):
    """HTTP and WebSocket entry point of the system (see the module docstring)."""

    name = "gateway"
    calls = (Register, Login, Verify, Logout, Perceive, Remember, Recall)

    class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
        """Gateway settings (``[plugins.gateway]`` in a manifest).

        ``host``/``port``: where to listen (port 0 = any free port; ``public_url`` tells).
        ``server``: ``uvicorn`` (default) or ``granian`` (experimental; see plugins/gateway/server.py).
        ``public_host``: host name used in ``public_url`` (default: ``host``, or 127.0.0.1 for 0.0.0.0).
        ``allowed_origins``: browser Origins allowed to open WebSockets (``"*"`` = any);
        the gateway's own origin is always allowed; clients that send no Origin are not browsers.
        ``max_frame_bytes``: largest WebSocket frame a client may send (close 1009 beyond).
        ``rate_per_s``/``rate_burst``: per-connection token bucket for client frames;
        ``rate_strikes``: consecutive over-limit frames answered with ``error`` before close 1008.
        ``ping_interval_s``/``ping_timeout_s``: protocol-level keepalive (0 = off).
        ``idle_timeout_s``: close a socket that sent nothing for this long (1000).
        ``send_queue_size``: frames queued per socket; ``slow_reader_timeout_s``: how long job
        events wait for space in a full queue before the slow reader is closed (1013).
        ``job_kinds``: job kind (HTTP/WS) → job contract address, e.g. ``{"helios": "helios.ask"}``.
        ``ws_calls``: request contract addresses a WebSocket ``call`` frame may use (each
        must be one of the gateway's declared ``calls``).
        ``verify_timeout_s``/``call_timeout_s``: deadlines of token checks and ``call`` frames.
        ``retry_after_s``: the hint sent with 503 and retryable error frames when the error
        carries none of its own (the auth plugin's hashing gate sends its estimate).
        ``backlog``: listen backlog (bursts of connects queue here).
        ``reuse_port``: bind with ``SO_REUSEPORT`` so that several gateway processes on one
        host share the port and the kernel spreads connections over them (Linux; replicas
        behind a Service need it not).
        ``keep_alive_s``: idle HTTP keep-alive before the server closes a connection; longer
        than clients' pools keep idle connections, so a reused one is not closed under a request.
        """

        host: str = "127.0.0.1"
        port: int = 8080
        server: str = "uvicorn"
        public_host: str = ""
        allowed_origins: list[str] = []
        max_frame_bytes: int = 65_536
        rate_per_s: float = 20.0
        rate_burst: int = 40
        rate_strikes: int = 10
        ping_interval_s: float = 20.0
        ping_timeout_s: float = 20.0
        idle_timeout_s: float = 300.0
        send_queue_size: int = 256
        slow_reader_timeout_s: float = 5.0
        job_kinds: dict[str, str] = {}
        ws_calls: list[str] = msgspec.field(default_factory=lambda: ["perception.perceive"])
        verify_timeout_s: float = 5.0
        call_timeout_s: float = 10.0
        retry_after_s: float = 1.0
        backlog: int = 4096
        keep_alive_s: float = 75.0
        reuse_port: bool = False

    config: Config

    def __init__(self, config: msgspec.Struct, kernel: Any) -> None:
        super().__init__(config, kernel)
        self.hub = Hub()
        self.public_url: str | None = None
        self.server: EmbeddedServer | EmbeddedGranian | None = None
        if self.config.server not in ("uvicorn", "granian"):
            raise ConfigError(f"[plugins.gateway] server: {self.config.server!r}; use uvicorn or granian")
        self.serving = False
        declared = {address_of(c): c for c in self.calls}
        unknown = [a for a in self.config.ws_calls if a not in declared]
        if unknown:
            raise ConfigError(
                f"[plugins.gateway] ws_calls: {', '.join(unknown)} not among the gateway's calls ({', '.join(sorted(declared))})"
            )
        self.ws_calls: dict[str, type] = {a: declared[a] for a in self.config.ws_calls}

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start the HTTP/WebSocket server on the pod's loop; on exit close sockets, then stop it."""
        cfg = self.config
        server_cls = EmbeddedGranian if cfg.server == "granian" else EmbeddedServer
        self.server = server_cls(  # type: ignore[assignment]
            build_asgi(self),
            host=cfg.host,
            port=cfg.port,
            max_frame_bytes=cfg.max_frame_bytes,
            ping_interval_s=cfg.ping_interval_s,
            ping_timeout_s=cfg.ping_timeout_s,
            backlog=cfg.backlog,
            keep_alive_s=cfg.keep_alive_s,
            reuse_port=cfg.reuse_port,
        )
        await self.server.start()
        host = cfg.public_host or ("127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host)
        if ":" in host:
            host = f"[{host}]"
        self.public_url = f"http://{host}:{self.server.bound_port}"
        self.serving = True
        log.info("gateway listening at %s", self.public_url)
        try:
            yield
        finally:
            self.serving = False
            await self.hub.close_all()
            await self.server.stop()

    def readiness(self) -> str | None:
        """Not ready until the server listens."""
        return None if self.serving else "gateway server not listening"

    # -- helpers used by the HTTP and WebSocket handlers ---------------------------------

    async def verify(self, token: str) -> Claims:
        """Verify a bearer token with ``auth.verify``.

        Raises:
            RemoteError (type ``InvalidToken``), Overloaded, DeadlineExceeded, Unavailable.
        """
        return await self.kernel.call(Verify(token=token), timeout_s=self.config.verify_timeout_s)

    async def submit(self, address: str, input: dict[str, Any], subject: str, idempotency_key: str | None) -> str:
        """Submit a JSON job to ``address`` for user ``subject``; return the job id.

        The job's ``owner`` field is set to ``subject`` whatever the client sent (helios
        recalls only that owner's memories), and the job is recorded as the user's: only
        they can read, stream, resume or cancel it. The idempotency key is scoped to the
        user, so two users' keys never collide.
        """
        key = f"{subject}:{idempotency_key}" if idempotency_key else None
        body = msgspec.json.encode({**input, "owner": subject})
        return await self.kernel.submit_json(address, body, idempotency_key=key, owner=subject)

    async def owns(self, job_id: str, subject: str) -> bool:
        """True when user ``subject`` submitted job ``job_id`` (False for unknown jobs too)."""
        return await self.kernel.job_owner(job_id) == subject

    @serves(TokenRevoked, concurrency=8, max_queue=100_000)
    async def on_revoked(self, ev: TokenRevoked) -> None:
        """Close every socket opened with the revoked token (4001)."""
        n = self.hub.revoke(ev.jti, float(ev.exp))
        if n:
            log.info("token %s revoked: closing %d socket(s)", ev.jti, n)
