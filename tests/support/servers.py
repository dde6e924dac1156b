"""The server helpers moved to :mod:`aiwfe.testing.servers` (the installed toolkit) and are
re-exported here for the project's tests; :func:`nats_hello` is the project's own."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiwfe.testing.servers import (
    SecuredNats,
    docker_available,
    nats_service,
    postgres_service,
    qdrant_service,
    redis_service,
    secured_nats,
)

__all__ = [
    "SecuredNats",
    "docker_available",
    "nats_hello",
    "nats_service",
    "postgres_service",
    "qdrant_service",
    "redis_service",
    "secured_nats",
]


async def nats_hello(host: str, port: int, user: str | None, password: str | None) -> str:
    """Speak the NATS protocol by hand (nats-py leaks a socket on a refused connect): send
    CONNECT with these credentials and a PING; return the server's answer line."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await reader.readline()).startswith(b"INFO ")
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "protocol": 1}
        if user is not None:
            opts |= {"user": user, "pass": password}
        writer.write(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
