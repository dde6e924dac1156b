"""``aiwfe bench ws``: N authenticated WebSockets through the gateway against a bare echo and a relay.

Every connection sends one ``call`` frame per second (``perception.perceive``) that goes
gateway → kernel → NATS → the perception plugin in another pod → back on the socket,
and measures the round trip. Two baselines run in the same run, at the same N and from the
same load generators (:mod:`aiwfe.bench._ws_servers`): a bare Litestar WebSocket **echo**
under the same ASGI server and garbage-collector settings, and the **relay**: the same
work (the frame decoded, a NATS request to a process running perception's ``perceive``, the
reply frame) with bare Litestar and nats-py and nothing of AIWFE, the floor under the
gateway phase (``--no-relay`` skips it).

Processes (so that the load generator does not starve the server on a small machine):
``--replicas`` gateway pod processes sharing one port with ``SO_REUSEPORT`` (default 2, the
consolidated manifest's ``min_replicas`` for the gateway pod, as ``auth-burst`` runs it) and
the worker pod (perception) in its own process, as deployed (on a private embedded
nats-server unless ``--url``; ``--local`` puts perception in the gateway's pods instead);
the echo baseline runs as many processes on one port. Each pod's processes run at the CPU
weight of its pod's CPU request in ``manifests/consolidated.toml``, as ``aiwfe up`` runs
them (:mod:`aiwfe.kernel.tools.cpu_share`: the gateway's 500m at nice +3, the worker's 1000m
at 0; the echo and the relay at the gateway's); ``--equal-weights`` runs every process at the
same weight (no difference beyond the noise so far: PERFORMANCE.md "Sixth pass").
``--clients`` load-generator processes open ``N / clients`` sockets each (:class:`~aiwfe.bench._ws_client.LeanWs`: a
bare protocol, one scheduler task). Every process raises its open-file limit to the hard
limit. Sends follow a fixed schedule (one per second per socket, phases spread over the
second), so a slow reply does not reduce the offered load; a socket has at most one frame
outstanding.

CPU: ``cpu_us_per_frame`` (and ``echo_cpu_us_per_frame``) give each server process's CPU
time (``/proc``, user + system) from GO until the last reply, and the load generators'
together, in µs per frame sent: unlike the latencies, these hardly depend on other work on
the machine.

Last line: ``{"connections", "connected_pct", "p50_ms", "p99_ms", "echo_p50_ms",
"echo_p99_ms", "cpu_us_per_frame", "echo_cpu_us_per_frame", "relay_p50_ms", "relay_p99_ms",
"relay_cpu_us_per_frame", "cpu_ratio_to_relay", "replicas", "niceness", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from aiwfe.kernel import Plugin, serves
from aiwfe.kernel.tools.cpu_share import lower_priority, pod_niceness
from aiwfe.plugins.auth.contract import Claims, Verify

from ._support import cpu_s, emit, load_avg_1m, nats_pid, nats_server, percentile, raise_nofile
from ._ws_client import HandshakeRefused, RawWs, load_runner, open_timed, run_load  # the client side, re-exported
from ._ws_servers import serve_echo, serve_responder

__all__ = ["BenchAuthPlugin", "HandshakeRefused", "RawWs", "cpu_s", "load_avg_1m", "main", "open_timed", "raise_nofile"]


SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
AUDIENCE = "aiwfe"
ROOT = Path(__file__).resolve().parent.parent


class InvalidToken(Exception):
    retryable = False


class BenchAuthPlugin(Plugin):
    """Verifies the benchmark's HS256 tokens (what the auth plugin's verify does, minus storage)."""

    name = "benchauth"

    @serves(Verify, concurrency=512, max_queue=100_000)
    async def verify(self, req: Verify) -> Claims:
        import jwt

        try:
            p = jwt.decode(req.token, SECRET, algorithms=["HS256"], audience=AUDIENCE)
        except jwt.PyJWTError as e:
            raise InvalidToken(str(e)) from None
        return Claims(sub=p["sub"], username=p["sub"], jti=p["jti"], exp=p["exp"], iat=p["iat"])


def make_token(sub: str) -> str:
    """A token :class:`BenchAuthPlugin` accepts."""
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": sub, "jti": uuid.uuid4().hex, "iat": now, "exp": now + 3600, "aud": AUDIENCE}, SECRET, "HS256")


# -- server processes -----------------------------------------------------------------


def _deployed_cpu_requests() -> tuple[str, str]:
    """The CPU requests of the consolidated manifest's pods that run the gateway and perception."""
    from aiwfe.kernel.manifest import load_manifest

    m = load_manifest(ROOT / "manifests" / "consolidated.toml")
    gw, work = m.pod_of("gateway"), m.pod_of("perception")
    assert gw is not None and work is not None, "manifests/consolidated.toml runs the gateway and perception"
    return m.pods[gw].resources.cpu_request, m.pods[work].resources.cpu_request


def _manifest(prefix: str, local: bool, server: str, port: int = 0) -> Any:
    """The benchmark's manifest: pod ``gw`` (gateway and the bench's auth, and perception with
    ``local``) and pod ``work`` (perception), each with the CPU request of the consolidated
    manifest's pod that runs it."""
    from aiwfe.kernel.manifest import parse_manifest

    gw_cpu, work_cpu = _deployed_cpu_requests()
    worker_pod = "" if local else f'[pods.work]\nplugins = ["perception"]\nresources = {{ cpu_request = "{work_cpu}" }}'
    gw_plugins = '"gateway", "aiwfe.bench.ws:BenchAuthPlugin"' + (', "perception"' if local else "")
    return parse_manifest(
        f"""
        [system]
        subject_prefix = "{prefix}"
        drain_timeout_s = 2
        [pods.gw]
        plugins = [{gw_plugins}]
        resources = {{ cpu_request = "{gw_cpu}" }}
        {worker_pod}
        [plugins.gateway]
        port = {port}
        reuse_port = true
        server = "{server}"
        rate_per_s = 100.0
        rate_burst = 200
        idle_timeout_s = 3600
        backlog = 8192
        """
    )


async def _serve_pod(nats_url: str, prefix: str, pod: str, local: bool, server: str, port: int) -> None:
    """Run one pod of the benchmark's manifest until stdin closes (``gw`` prints its URL;
    its replicas bind the same ``port`` with ``SO_REUSEPORT``)."""
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.pod import PodRunner

    m = _manifest(prefix, local, server, port)
    async with PodRunner(m, pod, NatsBus(nats_url, prefix, name=pod), ops_port=0) as runner:
        if pod == "gw":
            url = runner.plugins["gateway"].public_url  # type: ignore[attr-defined]
            print(f"READY {url.replace('http://', 'ws://')}/v1/ws", flush=True)
        else:
            print("READY -", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- orchestration --------------------------------------------------------------------


_UVLOOP: list[str] = []


def _spawn(*args: str, nice: int = 0) -> subprocess.Popen[str]:
    """A process of this module (``--role`` in ``args``) ``nice`` steps above this one's
    niceness (:func:`~aiwfe.kernel.tools.cpu_share.lower_priority`)."""
    return subprocess.Popen(
        [sys.executable, "-m", "aiwfe.bench.ws", *args, *_UVLOOP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=lower_priority(nice),
    )


def _read_ready(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    for line in p.stdout:
        if line.startswith("READY "):
            return line.split()[1]
    raise RuntimeError("server process ended before it was ready")


def _phase(
    url: str, mode: str, n: int, clients: int, seconds: float, ramp: int, warmup: int, servers: dict[str, int]
) -> dict[str, Any]:
    """Run one phase; ``servers`` (name → pid) are the server processes whose CPU seconds
    during the load (from GO to the last reply) are reported as µs per frame sent."""
    share = [n // clients + (1 if i < n % clients else 0) for i in range(clients)]
    tmp = tempfile.mkdtemp(prefix="aiwfe-bench-ws-")
    outs = [os.path.join(tmp, f"client{i}.json") for i in range(len(share))]
    procs = [_spawn("--role", "client", "--target", url, "--mode", mode, "-n", str(k), "--duration", str(seconds),
                    "--ramp", str(ramp), "--warmup", str(warmup), "--out", out)
             for k, out in zip(share, outs, strict=True) if k]  # fmt: skip

    def line(p: subprocess.Popen[str], what: str) -> Any:
        assert p.stdout is not None
        text = p.stdout.readline()
        if not text:
            raise RuntimeError(f"a load generator ended before {what} (exit status {p.poll()})")
        return json.loads(text)

    try:
        t0 = time.perf_counter()
        for p in procs:  # each prints {"connected"} once its sockets are open
            line(p, "its sockets were open")
        ramp_s = time.perf_counter() - t0
        cpu0 = {name: cpu_s(pid) for name, pid in servers.items()}
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("GO\n")
            p.stdin.flush()
        for p in procs:
            line(p, "its load was over")  # {"done"}: its load is over, its sockets still open
        cpu1 = {name: cpu_s(pid) for name, pid in servers.items()}
        for p in procs:
            p.communicate("CLOSE\n", timeout=seconds + 300)
    finally:
        for p in procs:  # a failed phase leaves no load generator behind
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads(Path(out).read_bytes()) for out, k in zip(outs, share, strict=True) if k]
    shutil.rmtree(tmp, ignore_errors=True)
    lat = [x for r in results for x in r["lat_ms"]]
    conn_ms = [x for r in results for x in r["connect_ms"]]
    return {
        "connected": sum(r["connected"] for r in results),
        "failures": [f for r in results for f in r["failures"]],
        "errors": sum(r["errors"] for r in results),
        "closed": sum(r["closed"] for r in results),
        "p50_ms": round(percentile(lat, 50), 2),
        "p99_ms": round(percentile(lat, 99), 2),
        "samples": len(lat),
        "connect_p99_ms": round(percentile(conn_ms, 99), 1),
        "ramp_s": round(ramp_s, 2),
        "cpu_us_per_frame": _per_frame(cpu0, cpu1, results),
    }


def _per_frame(cpu0: dict[str, float | None], cpu1: dict[str, float | None], results: list[dict[str, Any]]) -> dict[str, float]:
    """CPU µs per frame sent of each server process and of the load generators together
    (robust to other work on the machine, unlike the latencies)."""
    frames = sum(r["frames"] for r in results)
    out: dict[str, float] = {}
    if not frames:
        return out
    for name, before in cpu0.items():
        after = cpu1.get(name)
        if before is not None and after is not None:
            out[name] = round((after - before) * 1e6 / frames, 1)
    out["clients"] = round(sum(r["cpu_s"] for r in results) * 1e6 / frames, 1)
    return out


def _stop(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(Exception):
        assert p.stdin is not None
        p.stdin.close()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _replicas(first: list[str], n: int, nice: int = 0) -> tuple[list[subprocess.Popen[str]], str]:
    """Start ``n`` server processes: the first binds a free port, the others the same port
    (``SO_REUSEPORT``: the kernel spreads connections over them, as a Service over pods).
    Returns the processes and the URL the first printed."""
    procs = [_spawn(*first, "--port", "0", nice=nice)]
    try:
        url = _read_ready(procs[0])
        port = urlsplit(url).port
        for _ in range(1, n):
            procs.append(_spawn(*first, "--port", str(port), nice=nice))
            _read_ready(procs[-1])
    except BaseException:
        for p in procs:
            _stop(p)
        raise
    return procs, url


def _relay_phase(nats_url: str, args: argparse.Namespace, nice: dict[str, int]) -> dict[str, Any]:
    """The relay phase (:mod:`aiwfe.bench._ws_servers`): the relays at the gateway pod's
    weight, the responder at the worker pod's."""
    common = ["--nats", nats_url, "--prefix", f"benchrelay{os.getpid()}"]
    responder = _spawn("--role", "responder", *common, nice=nice.get("work", 0))
    srvs: list[subprocess.Popen[str]] = []
    try:
        _read_ready(responder)
        srvs, url = _replicas(["--role", "echo", *common], args.replicas, nice["gw"])
        servers = {f"relay{i}": p.pid for i, p in enumerate(srvs)} | {"responder": responder.pid}
        if (nats := nats_pid(nats_url)) is not None:
            servers["nats"] = nats
        return _phase(url, "gateway", args.connections, args.clients, args.duration, args.ramp, args.warmup, servers)
    finally:
        for p in [*srvs, responder]:
            _stop(p)


def _relay_figures(relay: dict[str, Any] | None, gw: dict[str, Any]) -> dict[str, Any]:
    if relay is None:
        return {}
    total = sum(relay["cpu_us_per_frame"].values())
    return {
        "relay_p50_ms": relay["p50_ms"],
        "relay_p99_ms": relay["p99_ms"],
        "relay_reply_errors": relay["errors"],
        "relay_cpu_us_per_frame": relay["cpu_us_per_frame"],
        "cpu_ratio_to_relay": round(sum(gw["cpu_us_per_frame"].values()) / total, 3) if total else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the echo baseline and the gateway phase; return the result object."""
    n = args.connections
    if args.replicas > 1 and args.server != "uvicorn":
        raise SystemExit("--replicas > 1 needs --server uvicorn (SO_REUSEPORT)")
    _UVLOOP[:] = ["--server", args.server, *(["--uvloop"] if args.uvloop else [])]
    # Each pod's CPU request as its CPU weight (as Kubernetes gives it); the echo stands in for
    # the gateway's pod and gets its weight. --equal-weights: every process at this one's.
    nice = {pod: 0 if args.equal_weights else n for pod, n in pod_niceness(_manifest("x", args.local, args.server)).items()}
    with nats_server(args.url) as nats_url:
        echo_srvs, echo_url = _replicas(["--role", "echo"], args.replicas, nice["gw"])
        try:
            servers = {f"echo{i}": p.pid for i, p in enumerate(echo_srvs)}
            echo = _phase(echo_url, "echo", n, args.clients, args.duration, args.ramp, args.warmup, servers)
        finally:
            for p in echo_srvs:
                _stop(p)
        relay = _relay_phase(nats_url, args, nice) if args.relay else None
        prefix = f"benchws{os.getpid()}"
        common = ["--nats", nats_url, "--prefix", prefix, *(["--local"] if args.local else [])]
        worker = None if args.local else _spawn("--role", "pod", "--pod", "work", *common, "--port", "0", nice=nice["work"])
        gw_srvs: list[subprocess.Popen[str]] = []
        try:
            if worker is not None:
                _read_ready(worker)
            gw_srvs, gw_url = _replicas(["--role", "pod", "--pod", "gw", *common], args.replicas, nice["gw"])
            servers = {f"gateway{i}": p.pid for i, p in enumerate(gw_srvs)}
            if worker is not None:
                servers["worker"] = worker.pid
            if (nats := nats_pid(nats_url)) is not None:
                servers["nats"] = nats
            gw = _phase(gw_url, "gateway", n, args.clients, args.duration, args.ramp, args.warmup, servers)
        finally:
            for p in gw_srvs:
                _stop(p)
            if worker is not None:
                _stop(worker)
    return {
        "connections": n,
        "connected_pct": round(100.0 * gw["connected"] / n, 2),
        "p50_ms": gw["p50_ms"],
        "p99_ms": gw["p99_ms"],
        "echo_p50_ms": echo["p50_ms"],
        "echo_p99_ms": echo["p99_ms"],
        "echo_connected_pct": round(100.0 * echo["connected"] / n, 2),
        "p99_ratio": round(gw["p99_ms"] / echo["p99_ms"], 2) if echo["p99_ms"] else None,
        "samples": gw["samples"],
        "reply_errors": gw["errors"],
        "dropped_sockets": gw["closed"],
        "connect_failures": len(gw["failures"]),
        "connect_p99_ms": gw["connect_p99_ms"],
        "ramp_s": gw["ramp_s"],
        "cpu_us_per_frame": gw["cpu_us_per_frame"],
        "echo_cpu_us_per_frame": echo["cpu_us_per_frame"],
        **_relay_figures(relay, gw),
        "clients": args.clients,
        "replicas": args.replicas,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "call_path": "local" if args.local else "remote",
        "loop": "uvloop" if args.uvloop else "asyncio",
        "client_loop": "uvloop" if args.uvloop else load_runner()[1],
        "server": args.server,
        "niceness": nice,
        "load_avg_1m": load_avg_1m(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str]) -> int:
    """Entry point of ``aiwfe bench ws``; returns the exit status."""
    p = argparse.ArgumentParser(prog="aiwfe bench ws", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--connections", "-n", type=int, default=1000)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per phase")
    p.add_argument("--clients", type=int, default=2, help="load-generator processes")
    p.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="gateway pod processes sharing the port, and as many echo processes (default 2: the consolidated "
        "manifest's min_replicas for the gateway pod, as in auth-burst)",
    )
    p.add_argument("--ramp", type=int, default=200, help="concurrent handshakes per load generator")
    p.add_argument("--warmup", type=int, default=2, help="first sends per socket not counted (seconds of warm-up)")
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument("--local", action="store_true", help="perception in the gateway's pod (in-process call)")
    p.add_argument("--server", default="uvicorn", choices=["uvicorn", "granian"], help="ASGI server of gateway and echo")
    p.add_argument("--uvloop", action="store_true", help="every process (servers and load) on uvloop instead of asyncio's loop")
    p.add_argument(
        "--equal-weights",
        action="store_true",
        help="every process at the same CPU weight (default: each pod's CPU request as its weight, as aiwfe up runs pods)",
    )
    p.add_argument(
        "--no-relay",
        dest="relay",
        action="store_false",
        help="skip the relay phase (the same work with bare Litestar, nats-py and perceive: AIWFE's floor)",
    )
    p.add_argument("--role", default="main", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--nats", help=argparse.SUPPRESS)
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--pod", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    raise_nofile()
    run_loop: Any = load_runner()[0] if args.role == "client" else asyncio.run
    if args.uvloop and args.role != "main":
        import uvloop

        run_loop = uvloop.run
    if args.role == "pod":
        run_loop(_serve_pod(args.nats, args.prefix, args.pod, args.local, args.server, args.port))
    elif args.role == "echo":
        run_loop(serve_echo(args.server, args.port, args.nats or "", f"{args.prefix}.perceive"))
    elif args.role == "responder":
        run_loop(serve_responder(args.nats, f"{args.prefix}.perceive"))
    elif args.role == "client":
        out = run_loop(run_load(args.target, args.connections, args.duration, args.mode, args.ramp, args.warmup, make_token))
        # The samples go to a file: a pipe left non-blocking by uvloop truncates a large line.
        Path(args.out).write_bytes(msgspec.json.encode(out))
    else:
        emit(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
