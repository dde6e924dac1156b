"""``aiwfe loadtest SCENARIO``: the old system's load-test plan, run against the real system.

Scenarios (defaults from ``shared/reference/old-system-performance-baseline.md``):

* ``normal``: 50 users × 10 requests; old target p95 < 200 ms, errors < 0.1 %.
* ``peak``: 200 users × 5 requests while 100 WebSockets send 1 msg/s; p95 < 500 ms, errors < 1 %.
* ``stress``: 500 users × 3 requests; graceful degradation (503 with Retry-After, no time-outs),
  recovery < 2 min, data integrity 100 %.
* ``websocket``: 1,000 connections × 1 msg/s for ``--duration`` s (120 here, 900 = the old
  plan's 15 minutes); connect success > 99.5 %, delivery p99 < 100 ms, no memory growth.

HTTP users log in, then cycle job submit (``POST /v1/jobs``, a helios job), job status
(``GET /v1/jobs/{id}``) and memory recall (``POST /v1/memory/recall``, when the gateway
serves it). Users are closed-loop (the next request leaves when the previous answered). With
``--duration D > 0`` (normal and peak by default: the plan's 600 and 300 s) each user waits
``D / requests`` between its requests and the users' starts are spread over one such interval,
which is the plan's offered load; with ``--duration 0`` (stress by default) they all start within
``--ramp`` seconds and send back to back, which measures capacity and overload behaviour.
Stress also probes recovery: after the burst, a fresh login + job submit every 0.5 s until three
in a row succeed within ``--recovery-latency``. Every scenario ends with the integrity check of
:mod:`bench._load_integrity` (every 202'd job has one outcome record, one terminal event, one
database row; no 503'd job exists).

The driver is asyncio (httpx for HTTP, :class:`bench.ws.RawWs` for WebSockets) in ``--clients``
processes; see PERFORMANCE.md for why not locust. Unless ``--url`` is given, the system is
started here with ``aiwfe up`` (:mod:`bench._load_system`). Output: a table on stderr, then one
JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ._load_setup import _Client, _has_recall, _login, _probe, _register, _rss_sampler, _seed, _split
from ._load_system import KDF_FAST, KDF_PRODUCTION, ManagedSystem
from ._support import emit, percentile

__all__ = ["SCENARIOS", "main"]

ROOT = Path(__file__).resolve().parent.parent

SCENARIOS: dict[str, dict[str, Any]] = {
    "normal": {
        "users": 50,
        "requests": 10,
        "websockets": 0,
        "duration_s": 600.0,
        "target_p95_ms": 200.0,
        "target_error_pct": 0.1,
    },
    "peak": {
        "users": 200,
        "requests": 5,
        "websockets": 100,
        "duration_s": 300.0,
        "target_p95_ms": 500.0,
        "target_error_pct": 1.0,
    },
    "stress": {
        "users": 500,
        "requests": 3,
        "websockets": 0,
        "duration_s": 0.0,
        "target_recovery_s": 120.0,
        "target_integrity_pct": 100.0,
    },
    "websocket": {
        "users": 0,
        "requests": 0,
        "websockets": 1000,
        "duration_s": 120.0,
        "target_connect_pct": 99.5,
        "target_delivery_p99_ms": 100.0,
    },
}
"""Per scenario: the old plan's users, requests per user and WebSockets; ``duration_s`` the
default window (normal and peak: the plan's 10 and 5 minutes, paced; stress: 0 = back to back,
because the plan's 3-minute pacing would offer 8 requests/s and stress nothing; websocket: the CI-size
2 minutes of the plan's 15); and the plan's targets."""


# -- setup ------------------------------------------------------------------------------


def run(
    args: argparse.Namespace, system: ManagedSystem | None, url: str, nats_url: str, prefix: str, db_url: str
) -> dict[str, Any]:
    """Run scenario ``args.scenario`` against the gateway at ``url``; return the JSON result."""
    sc = SCENARIOS[args.scenario]
    job_input = {"latency_s": args.job_latency, "max_experts": args.experts}
    tag = f"{prefix}{int(time.time()) % 100000}"
    t_setup = time.perf_counter()
    n_users = args.users
    n_ws = args.websockets
    ws_users = min(n_ws, args.ws_users) if n_ws else 0
    names = [f"{tag}u{i}" for i in range(n_users + ws_users + 2)]
    users = asyncio.run(_register(url, names))
    by_name = {u["username"]: u for u in users}
    users = [by_name[n] for n in names]
    http_users, ws_accounts, probes = users[:n_users], users[n_users : n_users + ws_users], users[-2:]
    tokens = asyncio.run(_login(url, ws_accounts)) if ws_accounts else []
    recall = _has_recall(url) and not args.no_recall
    if recall and args.seed_memories and http_users:
        seed_tokens = asyncio.run(_login(url, http_users))
        asyncio.run(_seed(url, seed_tokens, args.seed_memories))
    ok, _ = _probe(url, probes[0], job_input, wait_done_s=60)  # warm-up: connections, consumers, caches
    if not ok:
        raise RuntimeError("warm-up login + job submit failed")
    baseline_ms = sorted(_probe(url, probes[0], job_input)[1] for _ in range(5))[2]
    setup_s = time.perf_counter() - t_setup

    clients: list[_Client] = []
    http_clients: list[_Client] = []
    ws_clients: list[_Client] = []
    common = {"url": url, "timeout_s": args.timeout}
    paced = args.scenario != "websocket" and args.duration > 0
    think_s = args.duration / max(1, args.requests) if paced else 0.0
    for chunk in _split(http_users, args.clients):
        cfg = common | {"users": chunk, "requests": args.requests, "retries": args.retries, "think_s": think_s}
        cfg |= {"ramp_s": think_s if paced else args.ramp, "recall": recall, "job_input": job_input}
        cfg |= {"http_client": args.http_client, "deadline_s": args.duration + args.max_duration}
        http_clients.append(_Client(cfg))
    if n_ws:
        k = max(1, args.ws_clients)
        per = [n_ws // k + (1 if i < n_ws % k else 0) for i in range(k)]
        duration = args.duration if args.scenario == "websocket" else args.duration + args.max_duration
        for i, n in enumerate(per):
            if n:
                cfg = common | {"ws": n, "tokens": tokens[i::k] or tokens, "ramp": 100, "duration_s": duration}
                cfg |= {"frame": args.ws_frame, "reply_timeout_s": 10.0}
                ws_clients.append(_Client(cfg))
    clients = http_clients + ws_clients
    t_connect = time.perf_counter()
    for c in clients:
        c.wait_ready()
    connect_s = time.perf_counter() - t_connect

    stop_sampling = threading.Event()
    rss: list[tuple[float, int, int]] = []
    sampler = _rss_sampler(system, url, stop_sampling, 5.0, rss) if n_ws else None
    cpu0 = system.cpu_seconds() if system is not None else {}
    t0 = time.perf_counter()
    for c in clients:
        c.send("GO")
    for c in http_clients:
        c.collect()
    http_s = time.perf_counter() - t0
    burst_end = time.monotonic()
    for c in ws_clients:
        if http_clients:
            c.send("STOP")
        c.collect()
    stop_sampling.set()
    if sampler is not None:
        sampler.join(10)
    elapsed_s = time.perf_counter() - t0
    cpu1 = system.cpu_seconds() if system is not None else {}

    recovery_s = None
    recovery_ms = None
    if args.scenario == "stress":
        limit_ms = max(args.recovery_latency, 3 * baseline_ms)
        streak = 0
        while time.monotonic() - burst_end < args.max_duration:
            ok, ms = _probe(url, probes[1], job_input)
            streak = streak + 1 if ok and ms <= limit_ms else 0
            if streak == 3:
                recovery_s = round(time.monotonic() - burst_end, 2)
                recovery_ms = round(ms, 1)
                break
            time.sleep(0.5)

    http_results = [c.result for c in http_clients if c.result]
    ws_results = [c.result for c in ws_clients if c.result]
    attempts = [tuple(a) for r in http_results for a in r["attempts"]]
    accepted = [j for r in http_results for j in r["accepted"]]
    refused = [j for r in http_results for j in r["refused"]]
    unknown = [j for r in http_results for j in r["unknown"]]
    integrity: dict[str, Any] = {}
    if nats_url and (accepted or refused):
        from ._load_integrity import reconcile

        integrity = asyncio.run(reconcile(nats_url, prefix, db_url, accepted, refused, args.settle))

    lat = [float(a[2]) for a in attempts]
    outcomes = Counter(str(a[1]) for a in attempts)
    n_req = len(attempts)
    errors = n_req - outcomes["ok"]
    by_op: dict[str, list[float]] = {}
    for op, outcome, ms in attempts:
        if outcome == "ok":
            by_op.setdefault(str(op), []).append(float(ms))
    out: dict[str, Any] = {
        "scenario": args.scenario,
        "requests": n_req,
        "p95_ms": round(percentile(lat, 95), 1) if lat else None,
        "error_pct": round(100.0 * errors / n_req, 3) if n_req else 0.0,
    }
    if n_req:
        out |= {
            "users": n_users,
            "requests_per_user": args.requests,
            "p50_ms": round(percentile(lat, 50), 1),
            "p99_ms": round(percentile(lat, 99), 1),
            "max_ms": round(max(lat), 1),
            "rps": round(n_req / http_s, 1),
            "rejected_503_pct": round(100.0 * outcomes["503"] / n_req, 3),
            "timeouts": outcomes["timeout"],
            "ungraceful": errors - outcomes["503"],
            "outcomes": dict(outcomes),
            "ops_failed": sum(r["ops_failed"] for r in http_results),
            "users_unfinished": sum(r.get("users_unfinished", 0) for r in http_results),
            "p95_ms_by_op": {op: round(percentile(v, 95), 1) for op, v in sorted(by_op.items())},
            "recall": recall,
            "jobs_unknown": len(unknown),
        }
    if ws_results:
        ws_lat = [x for r in ws_results for x in r["lat_ms"]]
        connected = sum(r["connected"] for r in ws_results)
        sent = sum(r["sent"] for r in ws_results)
        out |= {
            "websockets": n_ws,
            "connect_pct": round(100.0 * connected / n_ws, 3),
            "connect_p99_ms": round(percentile([x for r in ws_results for x in r["connect_ms"]], 99), 1),
            "ws_messages": sent,
            "ws_lost": sum(r["lost"] for r in ws_results),
            "ws_dropped_connections": sum(r["dropped_connections"] for r in ws_results),
            "delivery_p50_ms": round(percentile(ws_lat, 50), 1) if ws_lat else None,
            "delivery_p99_ms": round(percentile(ws_lat, 99), 1) if ws_lat else None,
            "ws_frame": args.ws_frame,
            "ws_seconds": round(max(r["elapsed_s"] for r in ws_results), 1),
            "connect_failure_samples": [f for r in ws_results for f in r["connect_failures"]][:3],
        }
        if args.scenario == "websocket" and not out["requests"]:
            out["requests"] = sent
            out["p95_ms"] = round(percentile(ws_lat, 95), 1) if ws_lat else None
            out["error_pct"] = round(100.0 * (n_ws - connected + out["ws_lost"]) / max(1, n_ws + sent), 3)
    if len(rss) >= 2:
        # Growth in the steady state: the first sample is taken after every socket is open.
        out |= {
            "rss_start_mb": round(rss[0][1] / 2**20, 1),
            "rss_end_mb": round(rss[-1][1] / 2**20, 1),
            "rss_growth_mb": round((rss[-1][1] - rss[0][1]) / 2**20, 1),
            "rss_max_mb": round(max(s[1] for s in rss) / 2**20, 1),
            "rss_all_pods_growth_mb": round((rss[-1][2] - rss[0][2]) / 2**20, 1),
        }
    out |= integrity
    if args.scenario == "stress":
        out |= {"recovery_s": recovery_s, "recovery_probe_ms": recovery_ms, "baseline_probe_ms": round(baseline_ms, 1)}
    out |= {k: v for k, v in sc.items() if k.startswith("target_")}
    out["meets_target"] = _meets(args.scenario, out)
    client_cpu_s = sum(float(r.get("cpu_s", 0.0)) for r in http_results + ws_results)
    out |= {
        "paced": paced,
        "think_s": round(think_s, 1),
        "load_generator_cpu_s": round(client_cpu_s, 1),
        "pods_cpu_s": {k: round(v - cpu0.get(k, 0.0), 1) for k, v in cpu1.items()},
        "http_client": args.http_client,
        "kdf": args.kdf,
        "job_latency_s": args.job_latency,
        "clients": args.clients,
        "setup_s": round(setup_s, 1),
        "connect_s": round(connect_s, 1),
        "elapsed_s": round(elapsed_s, 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "error_samples": [s for r in http_results for s in r["samples"]][:5],
    }
    return out


def _meets(scenario: str, r: dict[str, Any]) -> bool:
    """Whether result ``r`` meets the old plan's targets for ``scenario``."""
    sc = SCENARIOS[scenario]
    integrity_ok = r.get("integrity_pct", 100.0) == 100.0 and r.get("users_unfinished", 0) == 0
    if scenario in ("normal", "peak"):
        ok = r["p95_ms"] is not None and r["p95_ms"] < sc["target_p95_ms"] and r["error_pct"] < sc["target_error_pct"]
        if "connect_pct" in r:
            ok = ok and r["connect_pct"] == 100.0
        return bool(ok and integrity_ok)
    if scenario == "stress":
        rec = r.get("recovery_s")
        return bool(r.get("ungraceful", 1) == 0 and rec is not None and rec < sc["target_recovery_s"] and integrity_ok)
    d = r.get("delivery_p99_ms")
    return bool(
        r.get("connect_pct", 0) > sc["target_connect_pct"]
        and d is not None
        and d < sc["target_delivery_p99_ms"]
        and r.get("rss_growth_mb", 0.0) < 50.0
    )


def _table(r: dict[str, Any]) -> str:
    """A human-readable table of result ``r``: figure, measured, old target."""
    targets = {
        "p95_ms": r.get("target_p95_ms"),
        "error_pct": r.get("target_error_pct"),
        "recovery_s": r.get("target_recovery_s"),
        "integrity_pct": r.get("target_integrity_pct"),
        "connect_pct": r.get("target_connect_pct"),
        "delivery_p99_ms": r.get("target_delivery_p99_ms"),
    }
    sign = {"connect_pct": ">", "integrity_pct": "="}
    rows = [f"{'figure':<26}{'measured':>14}  old target"]
    for k, v in r.items():
        if isinstance(v, (dict, list)) or k.startswith("target_"):
            continue
        t = targets.get(k)
        rows.append(f"{k:<26}{v!s:>14}  {'' if t is None else sign.get(k, '<') + ' ' + str(t)}")
    return "\n".join(rows)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options whose default depends on the scenario (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``aiwfe loadtest`` argument parser (every option documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="aiwfe loadtest",
        description="Run one load scenario of the old system's plan against the real system; "
        "a table on stderr, then one JSON line on stdout.",
        formatter_class=_Help,
    )
    p.add_argument("scenario", choices=sorted(SCENARIOS), help="normal | peak | stress | websocket")
    p.add_argument("--users", type=int, help="HTTP users (default: the scenario's: 50 / 200 / 500 / 0)")
    p.add_argument("--requests", type=int, help="requests per user, the first a login (default: 10 / 5 / 3)")
    p.add_argument("--websockets", type=int, help="WebSocket connections (default: 0 / 100 / 0 / 1000)")
    p.add_argument("--duration", type=float,
                   help="normal/peak/stress: window the users' requests are paced over, 0 = back to back "
                   "(default 600 / 300 / 0); websocket: seconds of 1 msg/s per socket (default 120; 900 = 15 min)")  # fmt: skip
    p.add_argument("--ws-frame", choices=["call", "ping"], default="call",
                   help="call: perception.perceive through NATS to another pod; ping: answered by the gateway")  # fmt: skip
    p.add_argument("--ws-users", type=int, default=100, help="accounts the WebSockets log in as (connections share their tokens)")
    p.add_argument("--ws-clients", type=int, default=2, help="load-generator processes for the WebSockets")
    p.add_argument("--http-client", choices=["raw", "httpx"], default="raw",
                   help="HTTP client of the users: raw = one keep-alive connection per user (bench/_load_http.py); "
                   "httpx = one shared httpx.AsyncClient per process (ms of CPU per request at hundreds of users)")  # fmt: skip
    p.add_argument("--clients", type=int, default=2, help="load-generator processes for the HTTP users")
    p.add_argument("--ramp", type=float, default=1.0, help="back to back (--duration 0): seconds over which the HTTP users start")
    p.add_argument("--retries", type=int, default=3, help="times a request answered 503 is retried after its Retry-After")
    p.add_argument("--timeout", type=float, default=30.0, help="client time-out per HTTP request, seconds")
    p.add_argument("--max-duration", type=float, default=300.0,
                   help="HTTP users still running --duration + this many seconds after the start are cut off "
                   "(counted in users_unfinished); also the longest stress recovery probe")  # fmt: skip
    p.add_argument(
        "--settle", type=float, default=180.0, help="seconds to wait for accepted jobs to finish before the integrity check"
    )
    p.add_argument("--job-latency", type=float, default=0.05, help="simulated LLM latency of each expert call (helios latency_s)")
    p.add_argument("--experts", type=int, default=2, help="experts per helios job (max_experts)")
    p.add_argument(
        "--seed-memories", type=int, default=3, help="memories stored per user before the run (setup), for recall to search"
    )
    p.add_argument("--no-recall", action="store_true", help="leave memory recall out of the mix even when the gateway serves it")
    p.add_argument("--recovery-latency", type=float, default=200.0,
                   help="stress: a login + submit probe has recovered under max(this, 3 x pre-burst) ms")  # fmt: skip
    p.add_argument("--kdf", choices=["fast", "production"], default="fast",
                   help="argon2id cost of the started system: fast (t=1, 8 MiB, p=1) or production (auth defaults)")  # fmt: skip
    p.add_argument("--url", help="gateway URL of an already running system (default: start one with aiwfe up)")
    p.add_argument("--nats-url", help="with --url: NATS URL for the integrity check (default $NATS_URL)")
    p.add_argument("--prefix", default="aiwfe", help="with --url: the system's subject prefix")
    p.add_argument("--database-url", help="with --url: PostgreSQL URL for the integrity check (default $DATABASE_URL)")
    p.add_argument("--keep", action="store_true", help="keep the started system's data directory and log")
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``aiwfe loadtest``; returns 0 (the JSON line says whether targets were met)."""
    args = build_parser().parse_args(argv)
    sc = SCENARIOS[args.scenario]
    args.users = sc["users"] if args.users is None else args.users
    args.requests = sc["requests"] if args.requests is None else args.requests
    args.websockets = sc["websockets"] if args.websockets is None else args.websockets
    args.duration = sc["duration_s"] if args.duration is None else args.duration
    from .ws import raise_nofile

    raise_nofile()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # runs the finally below: the started system is stopped

    signal.signal(signal.SIGTERM, on_term)
    system: ManagedSystem | None = None
    try:
        if args.url:
            url = args.url.rstrip("/")
            nats_url = args.nats_url or os.environ.get("NATS_URL", "")
            db_url = args.database_url or os.environ.get("DATABASE_URL", "")
            prefix = args.prefix
        else:
            system = ManagedSystem(kdf=KDF_FAST if args.kdf == "fast" else KDF_PRODUCTION, keep=args.keep)
            print(f"loadtest: starting the system (aiwfe up, data in {system.tmp}) ...", file=sys.stderr, flush=True)
            system.start()
            url, nats_url, db_url, prefix = system.url, system.nats_url, system.database_url, system.prefix
            print(f"loadtest: gateway at {url}; running {args.scenario}", file=sys.stderr, flush=True)
        result = run(args, system, url, nats_url, prefix, db_url)
    finally:
        if system is not None:
            system.stop()
    print(_table(result), file=sys.stderr, flush=True)
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
