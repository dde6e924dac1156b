"""Setting a load scenario up: accounts, logins, seeded memories, probes, the load-generator
processes and the RSS sampler (used by :mod:`aiwfe.bench.loadtest`)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ._load_system import ManagedSystem, gateway_rss_bytes

__all__ = ["MEMORIES", "PASSWORD", "_Client", "_has_recall", "_login", "_probe", "_register", "_rss_sampler", "_seed", "_split"]

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "load-test password 1"

# -- setup ------------------------------------------------------------------------------


async def _register(url: str, names: list[str], concurrency: int = 16) -> list[dict[str, str]]:
    """Register ``names`` (503s retried after Retry-After); return ``{username, password, user_id}``."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    out: list[dict[str, str]] = []

    async def one(c: httpx.AsyncClient, name: str) -> None:
        async with sem:
            for _ in range(100):
                r = await c.post("/v1/auth/register", json={"username": name, "password": PASSWORD})
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 201:
                    raise RuntimeError(f"register {name}: {r.status_code} {r.text[:200]}")
                out.append({"username": name, "password": PASSWORD, "user_id": r.json()["user_id"]})
                return
            raise RuntimeError(f"register {name}: still 503 after 100 tries")

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*(one(c, n) for n in names))
    return out


async def _login(url: str, users: list[dict[str, str]], concurrency: int = 8) -> list[str]:
    """Log ``users`` in (setup, not measured; 503s retried); return their tokens."""
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(c: httpx.AsyncClient, u: dict[str, str]) -> str:
        async with sem:
            for _ in range(100):
                r = await c.post("/v1/auth/login", json={"username": u["username"], "password": u["password"]})
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                r.raise_for_status()
                return str(r.json()["access_token"])
            raise RuntimeError(f"login {u['username']}: still 503 after 100 tries")

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return list(await asyncio.gather(*(one(c, u) for u in users)))


MEMORIES = (
    "The orders table has an index on customer_id and created_at.",
    "Deploys go through the pipeline with a canary stage before production.",
    "The frontend page calls the backend api with a bearer token.",
    "Model training data is refreshed weekly from the warehouse.",
    "Test coverage of the payment feature is below the team's target.",
)


async def _seed(url: str, tokens: list[str], per_user: int, concurrency: int = 32) -> None:
    """Store ``per_user`` memories for each user token (setup, not measured), so that recall
    searches real data; 503s are retried after Retry-After.

    Raises:
        RuntimeError: a store answered something other than 201 or 503.
    """
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(c: httpx.AsyncClient, token: str, i: int) -> None:
        body = {"text": MEMORIES[i % len(MEMORIES)], "metadata": {"seed": i}}
        async with sem:
            for _ in range(100):
                r = await c.post("/v1/memory", json=body, headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 201:
                    raise RuntimeError(f"store memory: {r.status_code} {r.text[:200]}")
                return

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        await asyncio.gather(*(one(c, t, i) for t in tokens for i in range(per_user)))


def _has_recall(url: str) -> bool:
    """True when the gateway's OpenAPI lists ``POST /v1/memory/recall``."""
    import httpx

    try:
        paths = httpx.get(f"{url}/schema/openapi.json", timeout=10).json().get("paths", {})
    except (httpx.HTTPError, ValueError):
        return False
    return "/v1/memory/recall" in paths


def _probe(url: str, user: dict[str, str], job_input: dict[str, Any], wait_done_s: float = 0.0) -> tuple[bool, float]:
    """One fresh login + job submit (+ wait for the job when ``wait_done_s``).

    Returns (both succeeded, login + submit time in ms).
    """
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        t0 = time.perf_counter()
        try:
            r = c.post("/v1/auth/login", json={"username": user["username"], "password": user["password"]})
            if r.status_code != 200:
                return False, (time.perf_counter() - t0) * 1000
            h = {"Authorization": f"Bearer {r.json()['access_token']}"}
            r = c.post(
                "/v1/jobs", json={"kind": "helios", "input": {"text": "probe: is the api healthy?", **job_input}}, headers=h
            )
        except httpx.HTTPError:
            return False, (time.perf_counter() - t0) * 1000
        ms = (time.perf_counter() - t0) * 1000
        if r.status_code != 202:
            return False, ms
        end = time.monotonic() + wait_done_s
        job_id = r.json()["job_id"]
        while wait_done_s and time.monotonic() < end:
            if c.get(f"/v1/jobs/{job_id}", headers=h).json().get("status") != "pending":
                break
            time.sleep(0.2)
        return True, ms


# -- load-generator processes -------------------------------------------------------------


class _Client:
    """A ``bench._load_client`` process: config on stdin, ``ready`` line, ``GO``, result line."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiwfe.bench._load_client"], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.send(json.dumps(cfg))
        self.ready: dict[str, Any] = {}
        self.result: dict[str, Any] | None = None

    def send(self, line: str) -> None:
        """Write ``line`` to the process's stdin (ignored once it has exited)."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def wait_ready(self) -> dict[str, Any]:
        """Wait for the process's ``ready`` line and return it.

        Raises:
            RuntimeError: the process exited during setup.
        """
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("load-generator process died during setup")
        self.ready = json.loads(line)
        return self.ready

    def collect(self) -> dict[str, Any]:
        """Wait for the process's result line (stdin stays open: closing it means STOP)."""
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.wait()
        if not out.strip():
            raise RuntimeError("load-generator process died without a result")
        self.result = json.loads(out.strip().splitlines()[-1])
        return self.result


def _split(items: list[Any], k: int) -> list[list[Any]]:
    """``items`` dealt round-robin into at most ``k`` non-empty lists."""
    return [items[i::k] for i in range(k) if items[i::k]]


# -- the run ------------------------------------------------------------------------------


def _rss_sampler(
    system: ManagedSystem | None, url: str, stop: threading.Event, period_s: float, samples: list[tuple[float, int, int]]
) -> threading.Thread:
    """Start a thread appending (elapsed s, gateway RSS, all pods' RSS) to ``samples`` now, every
    ``period_s`` and once more when ``stop`` is set; return the thread."""
    t0 = time.monotonic()

    def sample() -> None:
        if system is not None:
            rss = system.rss_bytes()
            samples.append((time.monotonic() - t0, rss.get("unified-api-gateway", 0), sum(rss.values())))
        else:
            g = gateway_rss_bytes(url)
            samples.append((time.monotonic() - t0, g, g))

    def run() -> None:
        sample()
        while not stop.wait(period_s):
            sample()
        sample()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread
