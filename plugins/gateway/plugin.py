"""The gateway plugin: Litestar HTTP + WebSocket + console, served inside the pod's loop.

It owns no contract of its own: it calls ``auth.*`` (register, login, verify, logout),
the request contracts listed in ``ws_calls`` (WebSocket ``call`` frames), submits jobs
as JSON by address (``job_kinds``), and listens to ``auth.revoked`` to close revoked
tokens' sockets with 4001. It builds one
:class:`~aiwfe.plugins.gateway.services.GatewayServices` and hands it to the HTTP surface
(:mod:`~aiwfe.plugins.gateway.app`) and the WebSocket endpoint
(:mod:`~aiwfe.plugins.gateway.ws`, :mod:`~aiwfe.plugins.gateway.commands`); neither
imports this module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from aiwfe.kernel import ConfigError, Plugin, address_of, serves
from aiwfe.kernel.config_check import one_of, problem_text
from aiwfe.plugins.auth.contract import (
    DeleteUser,
    DisableUser,
    Login,
    Logout,
    Register,
    SubjectRevoked,
    TokenRevoked,
    Verify,
    WhoAmI,
)
from aiwfe.plugins.memory.contract import Recall, Remember
from aiwfe.plugins.perception.contract import Perceive

from .app import build_asgi
from .config import SERVERS, GatewayConfig
from .hub import Hub
from .server import EmbeddedGranian, EmbeddedServer
from .services import GatewayServices

__all__ = ["GatewayPlugin"]

log = logging.getLogger("aiwfe.gateway")


class GatewayPlugin(Plugin):
    """HTTP and WebSocket entry point of the system (see the module docstring).

    ``public_url`` is where it listens once started; ``handles`` (a :class:`GatewayServices`)
    is what its handlers use (``services`` stays the ``Plugin.services`` tuple).
    """

    name = "gateway"
    calls = (Register, Login, Verify, Logout, WhoAmI, DisableUser, DeleteUser, Perceive, Remember, Recall)
    #: The admin and console routes read dead letters and the results bucket (admin.job_store).
    privileges = frozenset({"jobs"})
    Config = GatewayConfig
    #: ``job_kinds`` values must be jobs some pod of the manifest consumes (``aiwfe check``).
    config_addresses = {"job_kinds": "job"}

    config: GatewayConfig

    @classmethod
    def validate_config(cls, config: GatewayConfig) -> list[str | tuple[str, str]]:
        """``server`` one of :data:`SERVERS`; every ``ws_calls`` address among the gateway's ``calls``."""
        problems = one_of("server", config.server, SERVERS)
        if config.max_header_bytes < 1024:
            problems.append("max_header_bytes: must be at least 1024")
        if config.max_frame_depth < 1:
            problems.append("max_frame_depth: must be at least 1")
        if config.max_sockets_per_user < 1:
            problems.append("max_sockets_per_user: must be at least 1")
        if config.send_queue_size < 1 or config.send_queue_bytes < 1024:
            problems.append("send_queue_size, send_queue_bytes: must be at least 1 and 1024")
        declared = sorted(address_of(c) for c in cls.calls)
        unknown = [a for a in config.ws_calls if a not in declared]
        if unknown:
            problems.append(f"ws_calls: {', '.join(unknown)} not among the gateway's calls ({', '.join(declared)})")
        return problems

    def __init__(self, config: msgspec.Struct, kernel: Any) -> None:
        """Check the config (:meth:`validate_config`) and build the handlers' services.

        Raises:
            ConfigError: an unknown ``server``, or a ``ws_calls`` address not among ``calls``.
        """
        super().__init__(config, kernel)
        problems = self.validate_config(self.config)
        if problems:
            raise ConfigError("[plugins.gateway] " + "; ".join(map(problem_text, problems)))
        declared = {address_of(c): c for c in self.calls}
        self.hub = Hub()
        self.handles = GatewayServices(self.kernel, self.config, self.hub, {a: declared[a] for a in self.config.ws_calls})
        self.public_url: str | None = None
        self.server: EmbeddedServer | EmbeddedGranian | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Start the HTTP/WebSocket server on the pod's loop; on exit close sockets, then stop it."""
        cfg = self.config
        server_cls = EmbeddedGranian if cfg.server == "granian" else EmbeddedServer
        server = self.server = server_cls(
            build_asgi(self.handles),
            host=cfg.host,
            port=cfg.port,
            max_frame_bytes=cfg.max_frame_bytes,
            ping_interval_s=cfg.ping_interval_s,
            ping_timeout_s=cfg.ping_timeout_s,
            backlog=cfg.backlog,
            keep_alive_s=cfg.keep_alive_s,
            reuse_port=cfg.reuse_port,
            max_header_bytes=cfg.max_header_bytes,
        )
        await server.start()
        host = cfg.public_host or ("127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host)
        if ":" in host:
            host = f"[{host}]"
        self.public_url = f"http://{host}:{server.bound_port}"
        self.handles.serving = True
        log.info("gateway listening at %s", self.public_url)
        try:
            yield
        finally:
            self.handles.serving = False
            await self.hub.close_all()
            await server.stop()

    def readiness(self) -> str | None:
        """Not ready until the server listens."""
        return None if self.handles.serving else "gateway server not listening"

    @serves(TokenRevoked, concurrency=8, max_queue=100_000)
    async def on_revoked(self, ev: TokenRevoked) -> None:
        """Close every socket opened with the revoked token (4001)."""
        n = self.hub.revoke(ev.jti, float(ev.exp))
        if n:
            log.info("token %s revoked: closing %d socket(s)", ev.jti, n)

    @serves(SubjectRevoked, concurrency=8, max_queue=100_000)
    async def on_subject_revoked(self, ev: SubjectRevoked) -> None:
        """Close every socket of a disabled or deleted user (4001)."""
        n = self.hub.revoke_subject(ev.sub)
        if n:
            log.info("user %s revoked: closing %d socket(s)", ev.sub, n)
