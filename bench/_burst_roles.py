"""The processes of ``aiwfe bench auth-burst`` (:mod:`aiwfe.bench.auth_burst`) other than its
orchestrator: the gateway + auth server (``--role server``), the floor server (``--role
floor``) and the load generator (``--role client``)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import sys
import time
import uuid
from typing import Any, cast

from ._load_http import RawHttp
from ._ws_client import LeanWs

__all__ = ["PASSWORD", "SECRET", "client", "make_token", "serve", "serve_floor"]

SECRET = "bench-burst-secret-0123456789abcdef0123456789"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_FLOOR_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
PASSWORD = "correct horse battery staple"


def make_token(sub: str) -> str:
    """A token the auth plugin (configured with SECRET, kid k1) accepts."""
    import jwt

    now = int(time.time())
    payload = {"sub": sub, "username": sub, "jti": uuid.uuid4().hex, "iat": now, "nbf": now, "exp": now + 3600}
    payload |= {"iss": "aiwfe", "aud": "aiwfe", "scopes": []}
    return jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": "k1"})


# -- server ---------------------------------------------------------------------------


async def serve(nats_url: str, db_url: str, redis_url: str, kdf: str, server: str, port: int, pod_name: str) -> None:
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner

    prefix = f"benchburst{os.getppid()}"  # the same for every replica (one orchestrator)
    m = parse_manifest(
        f"""
        [system]
        subject_prefix = "{prefix}"
        drain_timeout_s = 2
        [pods.edge]
        plugins = ["gateway", "auth"]
        [plugins.gateway]
        port = {port}
        server = "{server}"
        backlog = 8192
        reuse_port = true
        [plugins.auth]
        database_url = "{db_url}"
        redis_url = "{redis_url}"
        redis_key_prefix = "{prefix}"
        jwt_secret = "{SECRET}"
        {kdf}
        """
    )
    async with PodRunner(m, "edge", NatsBus(nats_url, prefix, name=pod_name), ops_port=0) as pod:
        gw: Any = pod.plugins["gateway"]
        auth: Any = pod.plugins["auth"]
        pool = auth.store.pool
        peak = 0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                s = pool.get_stats()
                peak = max(peak, s.get("pool_size", 0) - s.get("pool_available", 0))
                await asyncio.sleep(0.005)  # finer sampling costs the measured loop CPU

        sampler = asyncio.create_task(sample())
        print(f"READY {gw.public_url}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "QUIT":
                break
            if line.strip() == "STATS":
                print(json.dumps({"pool_max_in_use": peak, "pool_max": pool.max_size}), flush=True)
                peak = 0
        sampling = False
        await sampler


class _Floor(asyncio.Protocol):
    """The least a Python asyncio server does per handshake (``--role floor``): find the end of
    the request head, answer 101 with the accept key, keep the socket until the client closes.
    No HTTP parser, no ASGI, no token check: what asyncio and the kernel cost alone."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.head: bytes | None = b""

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", self.head)
            accept = base64.b64encode(hashlib.sha1((key.group(1) if key else b"") + _GUID).digest())
            self.transport.write(_FLOOR_101 % accept)
            self.head = None
        elif len(self.head) > 16_384:  # the gateway's own bound on a request head
            self.transport.close()

    def eof_received(self) -> None:
        return None


async def serve_floor(port: int) -> None:
    from aiwfe.plugins.gateway.server import bind_socket

    sock = bind_socket("127.0.0.1", port, 8192, reuse_port=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Floor, sock=sock, backlog=8192)
    print(f"READY ws://127.0.0.1:{sock.getsockname()[1]}/v1/ws", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    server.close()


# -- load generator -------------------------------------------------------------------


async def client(url: str, connects: int, logins: int, users: list[str], window_s: float, start_at: float) -> dict[str, Any]:
    # A gateway's base URL, or (baseline) the bare echo's WebSocket URL as it printed it.
    ws_url = url if url.startswith("ws://") else url.replace("http://", "ws://") + "/v1/ws"
    tokens = [make_token(f"burst-{os.getpid()}-{i}") for i in range(connects)]
    opened: list[LeanWs] = []
    connect_ms: list[float] = []
    failures: list[str] = []
    login_ok = 0
    login_failed: list[str] = []
    retries = 0
    loop = asyncio.get_running_loop()
    t_start = loop.time() + max(0.0, start_at - time.time())

    async def connect(i: int) -> None:
        await asyncio.sleep(max(0.0, t_start + window_s * i / max(1, connects) - loop.time()))
        t0 = time.perf_counter()
        try:  # LeanWs: a protocol, not streams; the load generator shares the cores it measures
            ws = await LeanWs.connect(ws_url, {"Authorization": f"Bearer {tokens[i]}"})
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}"[:120])
            return
        connect_ms.append((time.perf_counter() - t0) * 1000)
        opened.append(ws)

    async def login(j: int) -> None:
        nonlocal login_ok, retries
        await asyncio.sleep(max(0.0, t_start + window_s * j / max(1, logins) - loop.time()))
        body = {"username": users[j % len(users)], "password": PASSWORD}
        give_up = loop.time() + 60
        http = RawHttp(url)  # a bare keep-alive client: httpx cost ~1 ms of CPU a request on the shared cores
        try:
            while True:
                try:
                    r = await http.request("POST", "/v1/auth/login", json_body=body, timeout_s=60)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                    login_failed.append(type(e).__name__)
                    return
                if r.status_code == 200:
                    login_ok += 1
                    return
                if r.status_code == 503 and loop.time() < give_up:
                    retries += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                login_failed.append(f"{r.status_code} {r.text[:80]}")
                return
        finally:
            http.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(connect(i) for i in range(connects)), *(login(j) for j in range(logins)))
    used_cpu_s = time.process_time() - cpu0
    await asyncio.sleep(0.5)  # every socket stays open until the whole burst is over
    for ws in opened:
        ws.close()
    return {
        "connected": len(opened),
        "connect_ms": connect_ms,
        "connect_failures": failures,
        "logins_ok": login_ok,
        "login_failures": login_failed,
        "login_retries": retries,
        "cpu_s": used_cpu_s,
    }
