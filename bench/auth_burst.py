"""``aiwfe bench auth-burst``: a login burst and a WebSocket connect burst, with and without Redis.

The old system failed 100 % of authentications under login bursts because its database
pool ran dry. This benchmark offers, inside one second, ``--connects`` WebSocket
handshakes with valid tokens (each verified by ``auth.verify`` before accept) and
``--logins`` password logins (argon2id, a database read each), through the gateway and the
real auth plugin (PostgreSQL pool, Redis claim cache), and reports:

* ``failures``: valid-token handshakes refused or failed, plus logins that never
  succeeded (a login answered 503 + ``Retry-After`` is retried after that delay, as the
  contract asks; ``login_retries`` counts those answers);
* ``p99_connect_ms``: handshake time at the client (TCP + HTTP upgrade + verify);
* ``pool_max_in_use`` vs ``pool_max``: the auth plugin's connection pool sampled every
  5 ms in the server process during the burst (the pool cannot exceed ``pool_max`` by
  construction; the sample shows how close the burst came);
* ``redis_down_failures``: the same burst (fresh tokens) after the benchmark's own
  Valkey has been stopped (the system Redis is never touched);
* ``cpu_us_per_connect``: CPU time of the servers, of the load generators and of the whole
  machine (``/proc/stat``, kernel network work included) over the connects offered, from just
  before the burst to the end of the last generator (closing the sockets included; with
  logins, their argon2 hashing and retries too: ``--logins 0`` gives the handshake's cost);
  ``machine_busy_cores``: the machine's busy time over that wall time. When the machine
  figure times the connects offered per second nears the number of cores, handshakes queue,
  and the p99 is mostly that queue;
* ``echo_p99_connect_ms`` and ``p99_ratio`` (gateway over echo): the baseline, run first in
  the same process run — the same connect burst from the same load generators against
  ``aiwfe bench ws``'s bare Litestar echo on the same ASGI server, as many replicas on one
  port. It is what the framework and the machine cost per handshake before any gateway
  work; a target below it is a target on the server, not on the gateway.
* ``floor_p99_connect_ms``, ``floor_cpu_us_per_connect``: a second baseline, run first — the
  same burst against :class:`_Floor`, a bare asyncio protocol that answers each request head
  with a 101 and nothing else: what Python's event loop and the kernel cost per handshake.

Processes: ``--replicas`` servers (default 2, the consolidated manifest's ``min_replicas``
for the gateway pod), each a gateway + auth pod on a private nats-server and Valkey,
sharing one port with ``SO_REUSEPORT`` so that the kernel spreads the connections as a
Service spreads them over pods (database from ``DATABASE_URL`` in a schema of its own,
else an embedded PostgreSQL), and ``--clients`` load generators (:class:`~aiwfe.bench._ws_client.LeanWs` sockets and bare
keep-alive HTTP for the logins, so that they take little of the shared cores). ``pool_max_in_use`` is the
highest of any replica (each has its own pool of ``pool_max``). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import msgspec

from ._load_http import RawHttp
from ._support import emit, nats_server, percentile
from ._ws_client import LeanWs, load_runner
from .ws import cpu_s, load_avg_1m, raise_nofile

__all__ = ["main"]

SECRET = "bench-burst-secret-0123456789abcdef0123456789"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_FLOOR_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
PASSWORD = "correct horse battery staple"
ROOT = Path(__file__).resolve().parent.parent


def make_token(sub: str) -> str:
    """A token the auth plugin (configured with SECRET, kid k1) accepts."""
    import jwt

    now = int(time.time())
    payload = {"sub": sub, "username": sub, "jti": uuid.uuid4().hex, "iat": now, "nbf": now, "exp": now + 3600}
    payload |= {"iss": "aiwfe", "aud": "aiwfe", "scopes": []}
    return jwt.encode(payload, SECRET, algorithm="HS256", headers={"kid": "k1"})


# -- server ---------------------------------------------------------------------------


async def _serve(nats_url: str, db_url: str, redis_url: str, kdf: str, server: str, port: int, pod_name: str) -> None:
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


async def _serve_floor(port: int) -> None:
    from aiwfe.plugins.gateway.server import bind_socket

    sock = bind_socket("127.0.0.1", port, 8192, reuse_port=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Floor, sock=sock, backlog=8192)
    print(f"READY ws://127.0.0.1:{sock.getsockname()[1]}/v1/ws", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    server.close()


# -- load generator -------------------------------------------------------------------


async def _client(url: str, connects: int, logins: int, users: list[str], window_s: float, start_at: float) -> dict[str, Any]:
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


# -- orchestration --------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "aiwfe.bench.auth_burst", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _ask(p: subprocess.Popen[str], line: str) -> dict[str, Any]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(line + "\n")
    p.stdin.flush()
    out: dict[str, Any] = json.loads(p.stdout.readline())
    return out


@contextlib.contextmanager
def _database() -> Iterator[str]:
    """A database URL with a schema of the benchmark's own (dropped after)."""
    url = os.environ.get("DATABASE_URL", "")
    if not url:
        from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres

        with tempfile.TemporaryDirectory(prefix="aiwfe-burst-pg-") as d, EmbeddedPostgres(d) as pg:
            yield pg.url
        return
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    schema = f"benchburst{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    params = conninfo_to_dict(url)
    params["options"] = (str(params.get("options", "")) + f" -c search_path={schema}").strip()
    try:
        yield make_conninfo("", **params)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _burst(url: str, args: argparse.Namespace, users: list[str], servers: list[int]) -> dict[str, Any]:
    """One burst from ``args.clients`` load generators against ``url``; ``servers``: the pids
    whose CPU time is charged to the burst (from 3 s before it starts, while every generator
    makes its tokens, to the end of the last generator)."""
    k = args.clients
    start_at = time.time() + 3.0  # every generator is up and has made its tokens by then
    procs = []
    for i in range(k):
        n_conn = args.connects // k + (1 if i < args.connects % k else 0)
        n_login = args.logins // k + (1 if i < args.logins % k else 0)
        cfg = {"url": url, "connects": n_conn, "logins": n_login, "users": users, "window_s": args.window, "start_at": start_at}
        procs.append(_spawn("--role", "client", "--config", json.dumps(cfg)))
    time.sleep(max(0.0, start_at - 0.2 - time.time()))
    server_cpu0, busy0, t0 = sum(cpu_s(pid) or 0.0 for pid in servers), _machine_busy_s(), time.monotonic()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    server_cpu, busy, wall = (
        sum(cpu_s(pid) or 0.0 for pid in servers) - server_cpu0,
        _machine_busy_s() - busy0,
        time.monotonic() - t0,
    )
    n = max(1, args.connects)
    conn_ms = [x for r in results for x in r["connect_ms"]]
    connect_failures = [f for r in results for f in r["connect_failures"]]
    login_failures = [f for r in results for f in r["login_failures"]]
    return {
        "connected": sum(r["connected"] for r in results),
        "logins_ok": sum(r["logins_ok"] for r in results),
        "connect_failures": connect_failures,
        "login_failures": login_failures,
        "login_retries": sum(r["login_retries"] for r in results),
        "p50_connect_ms": round(percentile(conn_ms, 50), 1),
        "p99_connect_ms": round(percentile(conn_ms, 99), 1),
        # CPU per connect from just before the burst to the end of the last generator (its
        # 0.5 s linger and the closes included): servers, load generators, whole machine. The
        # logins' hashing, when there are logins, is in it too.
        "cpu_us_per_connect": {
            "servers": round(server_cpu / n * 1e6),
            "load_generators": round(sum(r["cpu_s"] for r in results) / n * 1e6),
            "machine": round(busy / n * 1e6),
        },
        "machine_busy_cores": round(busy / wall, 2),
    }


def _ready_url(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line.startswith("READY "):
        raise RuntimeError(f"server did not start: {line!r}")
    return line.split()[1]


def _register(url: str, n: int) -> list[str]:
    import httpx

    users = [f"burst{os.getpid()}_{i}" for i in range(n)]
    with httpx.Client(base_url=url, timeout=60) as c:
        for u in users:
            while True:
                r = c.post("/v1/auth/register", json={"username": u, "password": PASSWORD})
                if r.status_code == 503:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                assert r.status_code in (201, 409), r.text
                break
    return users


def _baseline(args: argparse.Namespace) -> dict[str, Any]:
    """The same connect burst (no logins) against the bare Litestar echo of ``aiwfe bench
    ws`` on the same server and as many replicas on one port: what the framework and this
    machine cost per handshake before any gateway work (no token check, no limits)."""
    from .ws import _replicas, _stop

    procs, url = _replicas(["--role", "echo", "--server", args.server, *(["--uvloop"] if args.uvloop else [])], args.replicas)
    try:
        return _burst(url, argparse.Namespace(**{**vars(args), "logins": 0}), [], [p.pid for p in procs])
    finally:
        for p in procs:
            _stop(p)


def _floor(args: argparse.Namespace) -> dict[str, Any]:
    """The same connect burst against ``--replicas`` :class:`_Floor` processes on one port."""
    procs = [_spawn("--role", "floor", "--port", "0")]
    try:
        url = _ready_url(procs[0])
        port = url.rsplit(":", 1)[1].split("/", 1)[0]
        for _ in range(1, args.replicas):
            procs.append(_spawn("--role", "floor", "--port", port))
            _ready_url(procs[-1])
        return _burst(url, argparse.Namespace(**{**vars(args), "logins": 0}), [], [p.pid for p in procs])
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                assert p.stdin is not None
                p.stdin.close()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline burst, then both bursts (Redis up, then the benchmark's Valkey stopped);
    return the result object."""
    from aiwfe.kernel.tools.embedded_db import EmbeddedValkey

    floor = _floor(args)
    echo = _baseline(args)

    kdf = ""
    if args.kdf_time_cost:
        kdf += f"kdf_time_cost = {args.kdf_time_cost}\n"
    if args.kdf_memory_kib:
        kdf += f"kdf_memory_kib = {args.kdf_memory_kib}\n"
    if args.kdf_priority:
        kdf += f'kdf_priority = "{args.kdf_priority}"\n'
    with (
        tempfile.TemporaryDirectory(prefix="aiwfe-burst-") as tmp,
        nats_server(args.url) as nats_url,
        _database() as db_url,
        EmbeddedValkey(os.path.join(tmp, "valkey")) as valkey,
    ):
        common = ["--role", "server", "--nats", nats_url, "--db", db_url, "--redis", valkey.url, "--kdf", kdf,
                  "--server", args.server, *(["--uvloop"] if args.uvloop else [])]  # fmt: skip
        servers: list[subprocess.Popen[str]] = []
        try:
            # Replica 1 binds a free port; the others bind the same one (SO_REUSEPORT), and
            # the kernel spreads the connections over them, as a Service does over pods.
            servers.append(_spawn(*common, "--port", "0", "--pod-name", "edge-0"))
            url = _ready_url(servers[0])
            port = url.rsplit(":", 1)[1]
            for i in range(1, args.replicas):
                servers.append(_spawn(*common, "--port", port, "--pod-name", f"edge-{i}"))
                _ready_url(servers[-1])
            users = _register(url, args.users)
            for s in servers:
                _ask(s, "STATS")  # reset the pool peak after registration
            up = _burst(url, args, users, [p.pid for p in servers])
            pool = [_ask(s, "STATS") for s in servers]
            valkey.stop()
            down = _burst(url, args, users, [p.pid for p in servers])
            pool_down = [_ask(s, "STATS") for s in servers]
        finally:
            for server in servers:
                with contextlib.suppress(Exception):
                    assert server.stdin is not None
                    server.stdin.write("QUIT\n")
                    server.stdin.close()
            for server in servers:
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
    failures = len(up["connect_failures"]) + len(up["login_failures"])
    return {
        "connects": args.connects,
        "logins": args.logins,
        "failures": failures,
        "p99_connect_ms": up["p99_connect_ms"],
        "pool_max_in_use": max(p["pool_max_in_use"] for p in (*pool, *pool_down)),  # per replica
        "pool_max": pool[0]["pool_max"],
        "redis_down_failures": len(down["connect_failures"]) + len(down["login_failures"]),
        "p50_connect_ms": up["p50_connect_ms"],
        "login_retries": up["login_retries"],
        "redis_down_p99_connect_ms": down["p99_connect_ms"],
        # Redis up over Redis down: token checks that never wait for Redis keep this near 1.
        "redis_up_down_p99_ratio": round(up["p99_connect_ms"] / down["p99_connect_ms"], 2) if down["p99_connect_ms"] else None,
        "redis_down_login_retries": down["login_retries"],
        # The bare framework under the same burst and load generator (see _baseline).
        "echo_p50_connect_ms": echo["p50_connect_ms"],
        "echo_p99_connect_ms": echo["p99_connect_ms"],
        "echo_failures": len(echo["connect_failures"]),
        "p99_ratio": round(up["p99_connect_ms"] / echo["p99_connect_ms"], 2) if echo["p99_connect_ms"] else None,
        "cpu_us_per_connect": up["cpu_us_per_connect"],
        "machine_busy_cores": up["machine_busy_cores"],
        "redis_down_cpu_us_per_connect": down["cpu_us_per_connect"],
        "echo_cpu_us_per_connect": echo["cpu_us_per_connect"],
        "echo_machine_busy_cores": echo["machine_busy_cores"],
        "floor_p50_connect_ms": floor["p50_connect_ms"],
        "floor_p99_connect_ms": floor["p99_connect_ms"],
        "floor_failures": len(floor["connect_failures"]),
        "floor_cpu_us_per_connect": floor["cpu_us_per_connect"],
        "window_s": args.window,
        "replicas": args.replicas,
        "server": args.server,
        "loop": "uvloop" if args.uvloop else "asyncio",
        "failure_samples": (up["connect_failures"] + up["login_failures"] + down["connect_failures"] + down["login_failures"])[
            :5
        ],
        "cpus": os.cpu_count(),
        "load_avg_1m": load_avg_1m(),
    }


def main(argv: list[str]) -> int:
    """Entry point of ``aiwfe bench auth-burst``; returns the exit status."""
    p = argparse.ArgumentParser(prog="aiwfe bench auth-burst", description="WebSocket connect + login burst, Redis up and down")
    p.add_argument("--connects", type=int, default=2000)
    p.add_argument("--logins", type=int, default=200)
    p.add_argument("--users", type=int, default=20, help="registered users the logins cycle through")
    p.add_argument("--window", type=float, default=1.0, help="seconds the burst is spread over")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="gateway+auth pod processes sharing the port (default 2: the consolidated manifest's min_replicas)",
    )
    p.add_argument("--kdf-time-cost", type=int, default=0, help="argon2 time cost (default: the auth plugin's)")
    p.add_argument("--kdf-memory-kib", type=int, default=0, help="argon2 memory (default: the auth plugin's)")
    p.add_argument(
        "--kdf-priority", choices=["idle", "low", "normal"], help="hashing threads' CPU priority (default: the auth plugin's)"
    )
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument("--server", default="uvicorn", choices=["uvicorn", "granian"], help="the gateway's ASGI server")
    p.add_argument("--uvloop", action="store_true", help="gateway and echo servers on uvloop instead of asyncio's loop")
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--nats", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--redis", help=argparse.SUPPRESS)
    p.add_argument("--kdf", default="", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--pod-name", default="edge", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raise_nofile()
    if args.role == "server":
        serve = _serve(args.nats, args.db, args.redis, args.kdf, args.server, args.port, args.pod_name)
        if args.uvloop:
            import uvloop

            uvloop.run(serve)
        else:
            asyncio.run(serve)
    elif args.role == "floor":
        asyncio.run(_serve_floor(args.port))
    elif args.role == "client":
        c = json.loads(args.config)
        run_loop = load_runner()[0]  # uvloop when installed: the load shares the cores it measures
        out = run_loop(_client(c["url"], c["connects"], c["logins"], c["users"], c["window_s"], c["start_at"]))
        print(msgspec.json.encode(out).decode(), flush=True)
    else:
        emit(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
