"""One load-generator process of ``aiwfe loadtest`` (run as ``python -m bench._load_client``).

Its first stdin line is the config, a JSON object with ``url`` and either ``users`` (HTTP users) or ``ws`` (WebSocket
connections). Protocol on stdin/stdout, one JSON line each: the process does its setup (opens
its WebSockets), prints ``{"ready": ...}``, waits for ``GO`` on stdin, runs, and prints its
result. WebSockets run until ``STOP`` arrives on stdin or ``duration_s`` has passed.

HTTP users (closed model, no think time unless ``think_s``): each user logs in first and then
cycles through job submit, job status and (when the gateway has the route) memory recall.
A ``503`` is retried after its ``Retry-After`` (up to ``retries`` times); every attempt is a
request with its own latency and outcome. Job submits carry an ``idempotency_key`` so that the
job id of every submit, also of a refused one, is known for the integrity check.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ._load_http import RawHttp

__all__ = ["main", "plan"]

QUESTIONS = (
    "How should we index the orders table in the database to speed up the api?",
    "Review the deploy pipeline and the security of the backend api.",
    "What test coverage does the frontend page need before the next deploy?",
    "Plan the data model training and the performance budget of the feature.",
)


def plan(requests: int, recall: bool) -> list[str]:
    """The operations of one user: ``login`` first, then submit/status(/recall) in turn."""
    cycle = ["submit", "status", "recall"] if recall else ["submit", "status"]
    return ["login"] + [cycle[i % len(cycle)] for i in range(max(0, requests - 1))]


class _Log:
    """Everything one process observed, returned as JSON."""

    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, float]] = []  # (op, outcome, latency ms)
        self.accepted: list[str] = []  # job ids answered 202
        self.refused: list[str] = []  # job ids whose submit was answered 503 (never retried to success)
        self.unknown: list[str] = []  # job ids whose submit timed out or failed otherwise
        self.ops_failed = 0
        self.samples: list[str] = []

    def note(self, op: str, outcome: str, ms: float, detail: str = "") -> None:
        """Record one attempt (and a sample of what went wrong)."""
        self.attempts.append((op, outcome, round(ms, 3)))
        if outcome != "ok" and detail and len(self.samples) < 8:
            self.samples.append(f"{op}: {detail}"[:160])


Send = Callable[[str, str, Any, dict[str, str] | None], Awaitable[Any]]
"""(method, path, JSON body or None, headers) → a response with ``status_code``, ``headers``, ``text``, ``json()``."""


async def _request(
    send: Send, log: _Log, op: str, method: str, path: str, retries: int, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[str, Any]:
    """Send one operation (with 503 retries); return (final outcome, response or None).

    Outcomes: ``ok``, ``503`` (with Retry-After), ``503_no_retry_after``, ``http_<status>``,
    ``timeout``, ``error``.
    """
    import httpx

    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        try:
            r = await send(method, path, body, headers)
        except (TimeoutError, httpx.TimeoutException) as e:
            log.note(op, "timeout", (time.perf_counter() - t0) * 1000, type(e).__name__)
            return "timeout", None
        except (OSError, asyncio.IncompleteReadError, httpx.HTTPError) as e:
            log.note(op, "error", (time.perf_counter() - t0) * 1000, f"{type(e).__name__}: {e}")
            return "error", None
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code < 400:
            log.note(op, "ok", ms)
            return "ok", r
        if r.status_code == 503:
            retry_after = r.headers.get("retry-after")
            log.note(op, "503" if retry_after else "503_no_retry_after", ms, r.text[:100])
            if attempt < retries and retry_after:
                await asyncio.sleep(float(retry_after) * (0.5 + random.random()))
                continue
            return "503", r
        log.note(op, f"http_{r.status_code}", ms, r.text[:100])
        return f"http_{r.status_code}", r
    return "503", None


async def _user(send: Send, log: _Log, user: dict[str, str], ops: list[str], cfg: dict[str, Any]) -> None:
    """Run one user's operations ``ops`` through ``send``, noting every attempt in ``log``."""
    body: dict[str, Any]
    retries = int(cfg["retries"])
    token = ""
    last_job = ""
    for i, op in enumerate(ops):
        if i and cfg["think_s"]:
            await asyncio.sleep(cfg["think_s"])
        if op != "login" and not token:
            log.ops_failed += 1  # cannot act without a token
            continue
        headers = {"Authorization": f"Bearer {token}"}
        if op == "login":
            body = {"username": user["username"], "password": user["password"]}
            outcome, r = await _request(send, log, op, "POST", "/v1/auth/login", retries, body)
            if outcome == "ok":
                token = r.json()["access_token"]
        elif op == "submit":
            key = uuid.uuid4().hex
            job_id = uuid.uuid5(uuid.NAMESPACE_URL, f"aiwfe:helios.ask:{user['user_id']}:{key}").hex
            text = f"{QUESTIONS[i % len(QUESTIONS)]} ({user['username']} #{i})"
            body = {"kind": "helios", "input": {"text": text, **cfg["job_input"]}, "idempotency_key": key}
            outcome, r = await _request(send, log, op, "POST", "/v1/jobs", retries, body, headers)
            if outcome == "ok":
                if r.json()["job_id"] != job_id:
                    log.samples.append(f"job id {r.json()['job_id']} != derived {job_id}")
                last_job = job_id
                log.accepted.append(job_id)
            elif outcome == "503":
                log.refused.append(job_id)
            else:
                log.unknown.append(job_id)
        elif op == "status":
            if not last_job:
                log.ops_failed += 1
                continue
            outcome, _ = await _request(send, log, op, "GET", f"/v1/jobs/{last_job}", retries, None, headers)
        else:
            body = {"query": QUESTIONS[i % len(QUESTIONS)], "k": 5}
            outcome, _ = await _request(send, log, op, "POST", "/v1/memory/recall", retries, body, headers)
        if outcome != "ok":
            log.ops_failed += 1


async def _run_users(cfg: dict[str, Any]) -> dict[str, Any]:
    """Set up, wait for GO, run ``cfg['users']``; return the process's log as a JSON-able dict."""
    import httpx

    log = _Log()
    users: list[dict[str, str]] = cfg["users"]
    n = len(users)
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    timeout = httpx.Timeout(cfg["timeout_s"], connect=cfg["timeout_s"])
    print(json.dumps({"ready": n}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # GO
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=cfg["url"], timeout=timeout, limits=limits) as client:
        ops = plan(cfg["requests"], cfg["recall"])

        def sender(u: dict[str, str]) -> Send:
            if cfg.get("http_client") == "httpx":
                return lambda m, p, b, h: client.request(m, p, json=b, headers=h)
            conn = RawHttp(cfg["url"])  # one keep-alive connection per user, as a browser has
            return lambda m, p, b, h: conn.request(m, p, json_body=b, headers=h, timeout_s=cfg["timeout_s"])

        async def one(k: int, u: dict[str, str]) -> None:
            await asyncio.sleep(cfg["ramp_s"] * k / max(1, n))
            await _user(sender(u), log, u, ops, cfg)

        tasks = [asyncio.create_task(one(k, u)) for k, u in enumerate(users)]
        _, pending = await asyncio.wait(tasks, timeout=cfg["deadline_s"])
        for t in pending:  # the scenario's time bound: users still running are cut off
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "users_unfinished": len(pending),
        "cpu_s": time.process_time(),
        "attempts": log.attempts,
        "accepted": log.accepted,
        "refused": log.refused,
        "unknown": log.unknown,
        "ops_failed": log.ops_failed,
        "samples": log.samples,
        "elapsed_s": time.perf_counter() - t0,
    }


async def _run_ws(cfg: dict[str, Any]) -> dict[str, Any]:
    """Open ``cfg['ws']`` sockets, wait for GO, send 1 msg/s each until STOP or the duration; return the figures."""
    from .ws import RawWs, open_timed

    ws_url = cfg["url"].replace("http://", "ws://") + "/v1/ws"
    tokens: list[str] = cfg["tokens"]
    n = int(cfg["ws"])
    conns: list[RawWs] = []
    failures: list[str] = []
    connect_ms: list[float] = []
    sem = asyncio.Semaphore(int(cfg["ramp"]))

    async def open_one(i: int) -> None:
        async with sem:
            await open_timed(ws_url, {"Authorization": f"Bearer {tokens[i % len(tokens)]}"}, conns, connect_ms, failures)

    await asyncio.gather(*(open_one(i) for i in range(n)))
    print(json.dumps({"ready": len(conns)}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)  # GO
    stop = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.readline()  # STOP (or EOF)
        loop.call_soon_threadsafe(stop.set)

    # A daemon thread, not the loop's executor: asyncio.run would wait for a blocked readline.
    threading.Thread(target=watch_stdin, daemon=True).start()
    lat_ms: list[float] = []
    sent = 0
    lost = 0
    dropped = 0
    end = loop.time() + float(cfg["duration_s"])
    text = "How fast is the database index on the orders table?"

    async def drive(ws: RawWs) -> None:
        nonlocal sent, lost, dropped
        start = loop.time() + random.random()
        k = 0
        while True:
            at = start + k
            if at >= end:
                return
            delay = at - loop.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return
                except TimeoutError:
                    pass
            elif stop.is_set():
                return
            k += 1
            mid = str(k)
            if cfg["frame"] == "ping":
                frame = json.dumps({"type": "ping", "id": mid})
            else:
                frame = json.dumps({"type": "call", "contract": "perception.perceive", "input": {"text": text}, "id": mid})
            t0 = time.perf_counter()
            sent += 1
            try:
                ws.send(frame)
                async with asyncio.timeout(cfg["reply_timeout_s"]):
                    while json.loads(await ws.recv()).get("id") != mid:
                        pass
            except Exception:  # a time-out leaves the stream mid-frame: stop using this socket
                lost += 1
                dropped += 1
                return
            lat_ms.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(drive(ws) for ws in conns))
    elapsed = time.perf_counter() - t0
    for ws in conns:
        ws.close()
    return {
        "cpu_s": time.process_time(),
        "connected": len(conns),
        "connect_failures": failures,
        "connect_ms": connect_ms,
        "lat_ms": lat_ms,
        "sent": sent,
        "lost": lost,
        "dropped_connections": dropped,
        "elapsed_s": elapsed,
    }


def main(argv: list[str]) -> int:
    """Run one load-generator process with the JSON config read from stdin's first line.

    Accepts ``argv`` (unused). Never returns normally: it exits the process after printing.
    """
    from .ws import raise_nofile

    raise_nofile()
    cfg = json.loads(sys.stdin.readline())
    out = asyncio.run(_run_ws(cfg) if "ws" in cfg else _run_users(cfg))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of thousands of sockets


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
