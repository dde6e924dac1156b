"""The narrow interface the HTTP and WebSocket handlers get instead of the whole plugin.

:class:`GatewayServices` holds exactly what :mod:`~aiwfe.plugins.gateway.app`,
:mod:`~aiwfe.plugins.gateway.ws` and :mod:`~aiwfe.plugins.gateway.commands` use: the
kernel handle (:class:`aiwfe.kernel.plugin.KernelHandle`), the settings, the hub of open sockets, the contracts a
``call`` frame may use, whether the server is serving, and the verify/submit/owns
operations. :mod:`~aiwfe.plugins.gateway.plugin` builds it; nothing here imports the plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from aiwfe.kernel import AiwfeError
from aiwfe.kernel.plugin import KernelHandle
from aiwfe.plugins.auth.contract import Claims, Verify

from .config import GatewayConfig
from .hub import Hub

__all__ = ["GatewayServices"]


class GatewayServices:
    """What the gateway's handlers need; built by the plugin, shared by HTTP and WebSocket.

    ``serving`` is True while the server listens (``/ready``); the plugin sets it.
    """

    __slots__ = ("config", "hub", "kernel", "serving", "ws_calls")

    def __init__(self, kernel: KernelHandle, config: GatewayConfig, hub: Hub, ws_calls: Mapping[str, type]) -> None:
        self.kernel = kernel
        self.config = config
        self.hub = hub
        self.ws_calls = ws_calls
        self.serving = False

    def retry_after_s(self, e: AiwfeError) -> float:
        """The retry hint for a retryable error: its own, else ``config.retry_after_s``."""
        return e.retry_after_s or self.config.retry_after_s

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

        The input is validated against the job's contract before anything is recorded.

        Raises:
            BadInput (naming the field), TooLarge, Forbidden, Unavailable (from ``submit_json``).
        """
        key = f"{subject}:{idempotency_key}" if idempotency_key else None
        body = msgspec.json.encode({**input, "owner": subject})
        return await self.kernel.submit_json(address, body, idempotency_key=key, owner=subject)

    async def owns(self, job_id: str, subject: str) -> bool:
        """True when user ``subject`` submitted job ``job_id`` (False for unknown jobs too).

        Raises:
            AiwfeError: the owner could not be read (e.g. Unavailable).
        """
        return await self.kernel.job_owner(job_id) == subject
