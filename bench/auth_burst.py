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
  same burst against :class:`~aiwfe.bench._burst_roles._Floor`, a bare asyncio protocol that answers each request head
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
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from ._burst_roles import PASSWORD, client, serve, serve_floor
from ._support import cpu_s, emit, load_avg_1m, nats_server, percentile, raise_nofile, stop_children
from ._ws_client import load_runner
from .ws import _stop

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent


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
    from .ws import _replicas

    procs, url = _replicas(["--role", "echo", "--server", args.server, *(["--uvloop"] if args.uvloop else [])], args.replicas)
    try:
        return _burst(url, argparse.Namespace(**{**vars(args), "logins": 0}), [], [p.pid for p in procs])
    finally:
        for p in procs:
            _stop(p)


def _floor(args: argparse.Namespace) -> dict[str, Any]:
    """The same connect burst against ``--replicas`` :class:`~aiwfe.bench._burst_roles._Floor` processes on one port."""
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
            _stop(p)


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
            stop_children(servers, "QUIT\n")
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
        server = serve(args.nats, args.db, args.redis, args.kdf, args.server, args.port, args.pod_name)
        if args.uvloop:
            import uvloop

            uvloop.run(server)
        else:
            asyncio.run(server)
    elif args.role == "floor":
        asyncio.run(serve_floor(args.port))
    elif args.role == "client":
        c = json.loads(args.config)
        run_loop = load_runner()[0]  # uvloop when installed: the load shares the cores it measures
        out = run_loop(client(c["url"], c["connects"], c["logins"], c["users"], c["window_s"], c["start_at"]))
        print(msgspec.json.encode(out).decode(), flush=True)
    else:
        emit(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
