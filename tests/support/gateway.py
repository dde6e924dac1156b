"""Helpers for the gateway's tests: a one-pod system with the gateway, and a WS client."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import websockets
from websockets.asyncio.client import ClientConnection

from aiwfe.bus.base import Bus
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner

__all__ = [
    "AUTH_DOUBLE",
    "PROBE",
    "GatewaySystem",
    "gateway_manifest",
    "post_retrying",
    "recv_json",
    "register_and_login",
    "run_system",
    "ws_connect",
]

PROBE = "tests.support.probe:ProbePlugin"
AUTH_DOUBLE = "tests.support.auth_double:AuthDoublePlugin"
SPEW = "tests.support.gateway_probe:SpewPlugin"


def gateway_manifest(prefix: str, *, auth: str = AUTH_DOUBLE, gateway: str = "", auth_config: str = "") -> str:
    """A one-pod manifest: gateway, an auth implementation, probe, spew, perception, reasoning.

    ``gateway`` is extra TOML lines for ``[plugins.gateway]``; ``auth_config`` for the auth plugin.
    """
    return f"""
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 2
[pods.edge]
plugins = ["gateway", "{auth}", "{PROBE}", "{SPEW}", "perception", "reasoning"]
[plugins.gateway]
port = 0
job_kinds = {{ crunch = "probe.crunch", spew = "gwprobe.spew" }}
{gateway}
[plugins."{auth}"]
{auth_config}
"""


class GatewaySystem:
    """A started pod with the gateway: its runner, base URL and WebSocket URL."""

    def __init__(self, pod: PodRunner) -> None:
        self.pod = pod
        self.gateway: Any = cast(Any, pod.plugins["gateway"])
        self.url: str = str(self.gateway.public_url)
        self.ws_url = self.url.replace("http://", "ws://") + "/v1/ws"

    def plugin(self, name: str) -> Any:
        return self.pod.plugins[name]


@contextlib.asynccontextmanager
async def run_system(manifest: str, bus: Bus, pod: str = "edge") -> AsyncIterator[GatewaySystem]:
    """Start ``pod`` of ``manifest`` on ``bus``; yield a :class:`GatewaySystem`."""
    m = parse_manifest(manifest, env={})
    async with PodRunner(m, pod, bus, ops_port=0) as runner:
        yield GatewaySystem(runner)


def ws_connect(url: str, token: str | None = None, *, how: str = "header", **kw: Any) -> Any:
    """Open a WebSocket with ``token`` passed ``how`` (header, query, subprotocol)."""
    headers: dict[str, str] = dict(kw.pop("additional_headers", {}) or {})
    subprotocols = None
    if token is not None:
        if how == "header":
            headers["Authorization"] = f"Bearer {token}"
        elif how == "query":
            url = f"{url}?token={token}"
        else:
            subprotocols = ["bearer", token]
    return websockets.connect(url, additional_headers=headers, subprotocols=subprotocols, open_timeout=10, **kw)  # type: ignore[arg-type]


async def recv_json(ws: ClientConnection, timeout_s: float = 10.0) -> dict[str, Any]:
    """Receive one JSON frame (TimeoutError after ``timeout_s``)."""
    import asyncio

    async with asyncio.timeout(timeout_s):
        data = await ws.recv()
    out: dict[str, Any] = json.loads(data)
    return out


async def raw_ws_open(url: str, token: str, *, rcvbuf_bytes: int = 4096) -> tuple[Any, Any]:
    """Open a WebSocket by hand on a socket with a small receive buffer; return (reader, writer).

    For slow-reader tests: the caller sends with :func:`raw_ws_send_text` and then simply
    stops reading, which no client library lets one do reliably.
    """
    import asyncio
    import base64
    import os
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (u.hostname, u.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def raw_ws_send_text(writer: Any, text: str) -> None:
    """Send one masked text frame (client → server) on a socket from :func:`raw_ws_open`."""
    import os
    import struct

    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    writer.write(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


#: The HS256 secret the integration tests give the real auth plugin.
REAL_AUTH_SECRET = "integration-secret-0123456789abcdef0123456789"


def real_auth_config(pg_url: str, redis_url: str, prefix: str) -> str:
    """TOML lines for the real auth plugin on the test's own schema and Redis key prefix (fast KDF)."""
    return f"""
database_url = "{pg_url}"
redis_url = "{redis_url}"
redis_key_prefix = "{prefix}:auth"
jwt_secret = "{REAL_AUTH_SECRET}"
kdf_time_cost = 1
kdf_memory_kib = 8192
kdf_parallelism = 1
"""


def real_auth_tokens() -> dict[str, str]:
    """Tokens for the real auth plugin's key ring (kid ``k1``): one valid, the rest each wrong in one way."""
    import time
    import uuid

    import jwt

    def tok(secret: str | None = REAL_AUTH_SECRET, alg: str = "HS256", **over: Any) -> str:
        now = int(time.time())
        payload = {"sub": "u1", "username": "alice", "jti": uuid.uuid4().hex, "iat": now, "nbf": now, "exp": now + 600}
        payload |= {"iss": "aiwfe", "aud": "aiwfe", "scopes": []}
        payload |= over
        return jwt.encode(payload, secret, algorithm=alg, headers={"kid": "k1"})  # type: ignore[arg-type]

    now = int(time.time())
    return {
        "valid": tok(),
        "short_lived": tok(exp=now + 2),
        "expired": tok(exp=now - 600, iat=now - 1200, nbf=now - 1200),
        "forged": tok(secret="another-secret-0123456789abcdef0123456789"),
        "alg_none": tok(secret=None, alg="none"),
        "wrong_audience": tok(aud="somebody-else"),
        "garbage": "not-a-jwt",
    }


async def post_retrying(client: Any, path: str, body: dict[str, Any], *, attempts: int = 5, **kw: Any) -> Any:
    """POST as a well-behaved client does: a 503 is retried after its ``Retry-After`` (its
    documented meaning: a transient condition, such as a database connection not free within
    its wait on a loaded machine), at most ``attempts`` times; any other answer is returned."""
    import asyncio

    for _ in range(attempts - 1):
        r = await client.post(path, json=body, **kw)
        if r.status_code != 503:
            return r
        await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    return await client.post(path, json=body, **kw)


async def register_and_login(client: Any, username: str, password: str) -> str:
    """Register ``username`` and log in through the gateway's HTTP routes; its access token."""
    creds = {"username": username, "password": password}
    r = await post_retrying(client, "/v1/auth/register", creds)
    assert r.status_code == 201, r.text
    r = await post_retrying(client, "/v1/auth/login", creds)
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])
