"""``aiwfe bench fairshare``: another user's job latency while one user floods, against the
same jobs unloaded in the same run (goal: ``ratio`` ≤ 2).

One pod runs the gateway, helios, perception, reasoning (extractive, its default 64 calls at
once) and a token verifier, with helios's fair-share defaults: at most 8 unfinished jobs per
user, at most 6 experts per job (:mod:`aiwfe.kernel.quotas`); only the simulated latency a
client may ask for is allowed here (cap ``--flood-latency``).

1. unloaded: ``--jobs`` ordinary helios jobs of user ``other``, one after another, each
   timed from its WebSocket submit frame to its result frame;
2. loaded: ``--flooders`` loops of user ``flooder0`` submit jobs at the caps (6 experts,
   ``--flood-latency`` s per expert call, no cache) over HTTP as fast as they are answered,
   pausing ``--flood-pause`` s after a 429; once the flooder holds all its slots, the same
   ``--jobs`` of ``other`` again, while the flood goes on.

``--accounts N``: the flood loops act for N accounts, each at its job limit (two accounts
of one person: 16 jobs × 6 experts, more calls than reasoning's 64 provider slots).
``--without-fairness`` runs the same on a second system whose queues are first come, first
served (the owner keys dropped in this process) and whose reasoning keeps no slots back
(``reserved_slots = 0``), with at most 5 jobs of ``other``, and adds ``unfair_loaded_p50_ms``,
``unfair_ratio`` and ``unfair_loaded_max_ms``: what fair queueing and the reserve change.

The issue this answers: without limits, six jobs with 12 experts and 40 s each filled
reasoning's 64 slots and another user's job failed after 30 s. ``--without-limits`` repeats
that in the same run (a second system with no slot limit and those budgets allowed; about
35 s more) and adds ``unprotected_other_ms`` and ``unprotected_other_status``.

Pods run in this process on a private embedded nats-server (or ``--url``); the load
generator shares the cores. Last line, one JSON object: ``jobs``, ``limit``,
``unloaded_p50_ms``, ``loaded_p50_ms``, ``ratio`` (loaded p50 / unloaded p50),
``unloaded_p95_ms``, ``loaded_p95_ms``, ``p95_ratio``, ``other_failed``, ``flood_accepted``,
``loaded_max_ms``, ``flood_refused`` (429s), ``flood_errors`` (any other answer).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ._support import emit, nats_server, percentile

QUESTION = "How should the orders database index be designed?"
#: The flood's question touches every expertise tag, so its jobs get every expert they ask for.
FLOOD_QUESTION = (
    "Review the architecture, security, database, performance, deploy pipeline, frontend page, backend api, "
    "data, model training, test coverage, user feature and docs of the system"
)
LIMIT = 8  # helios.ask's max_jobs_per_owner
RUN = uuid.uuid4().hex[:8]

MANIFEST = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 1
[system.jobs."helios.ask"]
{limits}
[pods.all]
plugins = ["helios", "perception", "reasoning", "aiwfe.bench.ws:BenchAuthPlugin", "gateway"]
[plugins.gateway]
port = 0
job_kinds = {{ helios = "helios.ask" }}
[plugins.reasoning]
{reasoning}
"""


@contextlib.asynccontextmanager
async def _system(url: str, prefix: str, limits: str, reasoning: str = "") -> AsyncIterator[Any]:
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner

    m = parse_manifest(MANIFEST.format(prefix=prefix, limits=limits, reasoning=reasoning), env={})
    async with PodRunner(m, "all", NatsBus(url, prefix, name="bench-fairshare"), ops_port=0) as pod:
        yield pod


async def _other_jobs(ws_url: str, token: str, n: int, tag: str) -> tuple[list[float], int]:
    """``n`` ordinary jobs one after another: (ms from submit frame to result frame, failures).

    A submit the gateway answers ``rate_limited`` (the socket's frame rate: jobs this fast
    exceed it) is sent again after its ``retry_after_s``, as a client should; the wait counts."""
    import websockets

    times, failed = [], 0
    async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        for i in range(n):
            # a text of this run only: every expert call misses the answer cache, as a new question does
            frame = {"type": "submit", "kind": "helios", "input": {"text": f"{QUESTION} {RUN} {tag}{i}"}, "id": str(i)}
            t0 = time.perf_counter()
            await ws.send(msgspec.json.encode(frame).decode())
            while True:
                got = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 120))
                if got["type"] == "error" and got.get("code") == "rate_limited":
                    await asyncio.sleep(float(got.get("retry_after_s") or 0.01))
                    await ws.send(msgspec.json.encode(frame).decode())
                    continue
                if got["type"] == "error" or (got["type"] == "result"):
                    break
            times.append((time.perf_counter() - t0) * 1000)
            failed += got["type"] == "error" or got.get("status") != "done"
    return times, failed


class _Flood:
    """The flooders' submit loops (loop k acts for account k mod the number of tokens) and
    what they were answered."""

    def __init__(self, url: str, tokens: list[str], latency_s: float, pause_s: float) -> None:
        self.url, self.tokens, self.latency_s, self.pause_s = url, tokens, latency_s, pause_s
        self.accepted = self.refused = self.errors = 0
        self.full: set[int] = set()  # accounts answered 429 at least once: their slots are full
        self.stop = asyncio.Event()

    async def loop(self, k: int) -> None:
        import httpx

        job = {"text": FLOOD_QUESTION, "max_experts": 6, "deadline_s": 120.0, "expert_timeout_s": 30.0}
        job |= {"latency_s": self.latency_s, "use_cache": False}
        account = k % len(self.tokens)
        headers = {"Authorization": f"Bearer {self.tokens[account]}"}
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {"kind": "helios", "input": {**job, "text": f"{FLOOD_QUESTION} {k}.{i}"}}
                r = await c.post("/v1/jobs", json=body, headers=headers)
                if r.status_code == 202:
                    self.accepted += 1
                    continue
                if r.status_code == 429:
                    self.refused += 1
                    self.full.add(account)
                else:
                    self.errors += 1
                await asyncio.sleep(self.pause_s)


async def _unprotected(url: str) -> tuple[float, str]:
    """The issue's measurement without fair share (no limits, no reserved provider slots,
    first-come queues): six jobs of 12 experts at 40 s each, then one ordinary job of
    another user: (its ms from submit to result, its status)."""
    import httpx

    from aiwfe.bench.ws import make_token

    limits = "max_per_owner = 0\ncaps = { max_experts = 12, latency_s = 40 }"
    with _fifo_queues():
        async with _system(url, "bfair" + uuid.uuid4().hex[:8], limits, "reserved_slots = 0") as pod:
            http_url = pod.plugins["gateway"].public_url
            job = {"text": FLOOD_QUESTION, "max_experts": 12, "latency_s": 40.0, "use_cache": False}
            async with httpx.AsyncClient(base_url=http_url, timeout=30) as c:
                for i in range(6):
                    r = await c.post(
                        "/v1/jobs",
                        json={"kind": "helios", "input": {**job, "text": f"{FLOOD_QUESTION} {i}"}},
                        headers={"Authorization": f"Bearer {make_token('flooder')}"},
                    )
                    r.raise_for_status()
            slots = pod.plugins["reasoning"]._slots  # the flood's expert calls take every one of them
            async with asyncio.timeout(20):
                while slots.active < slots.limit:
                    await asyncio.sleep(0.05)
            ws_url = http_url.replace("http://", "ws://") + "/v1/ws"
            times, failed = await _other_jobs(ws_url, make_token("other"), 1, "unprotected ")
    return times[0], "failed" if failed else "done"


@contextlib.contextmanager
def _fifo_queues() -> Any:
    """Every handler and provider queue in this process first come, first served (the
    owner keys dropped): the same system without fair queueing, for the comparison."""
    from aiwfe.kernel.limiter import Limiter

    enter, leave = Limiter.enter, Limiter.leave
    Limiter.enter = lambda self, key=None: enter(self, None)  # type: ignore[method-assign]
    Limiter.leave = lambda self, key=None: leave(self, None)  # type: ignore[method-assign]
    try:
        yield
    finally:
        Limiter.enter, Limiter.leave = enter, leave  # type: ignore[method-assign]


async def _loaded(
    url: str, jobs: int, flooders: int, accounts: int, flood_latency_s: float, pause_s: float, fair: bool
) -> dict[str, Any]:
    """A fresh system: ``jobs`` of user ``other`` unloaded, then while ``accounts`` flood
    (``fair``: as shipped; else FIFO queues and no reserved provider slots)."""
    from aiwfe.bench.ws import make_token

    prefix = "bfair" + uuid.uuid4().hex[:8]
    limits = f"caps = {{ latency_s = {flood_latency_s} }}"
    async with _system(url, prefix, limits, "" if fair else "reserved_slots = 0") as pod:
        http_url = pod.plugins["gateway"].public_url
        ws_url = http_url.replace("http://", "ws://") + "/v1/ws"
        other = make_token("other")
        await _other_jobs(ws_url, other, 3, "warm-up ")  # connections, decoders, the expert index
        # the texts differ between the systems too: a shared answer cache (Redis) must miss
        unloaded, failed_unloaded = await _other_jobs(ws_url, other, jobs, f"unloaded {prefix} ")

        flood = _Flood(http_url, [make_token(f"flooder{a}") for a in range(accounts)], flood_latency_s, pause_s)
        loops = [asyncio.create_task(flood.loop(k)) for k in range(max(flooders, accounts))]
        try:
            async with asyncio.timeout(60):
                while len(flood.full) < accounts:  # every account is at its limit
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # their experts' calls reach reasoning
            loaded, failed_loaded = await _other_jobs(ws_url, other, jobs, f"loaded {prefix} ")
        finally:
            flood.stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
    return {
        "unloaded": unloaded,
        "loaded": loaded,
        "failed": failed_unloaded + failed_loaded,
        "flood": flood,
    }


async def run(
    url: str,
    jobs: int,
    flooders: int,
    flood_latency_s: float,
    pause_s: float,
    without_limits: bool = False,
    accounts: int = 1,
    without_fairness: bool = False,
) -> dict[str, Any]:
    got = await _loaded(url, jobs, flooders, accounts, flood_latency_s, pause_s, True)
    unloaded, loaded, flood = got["unloaded"], got["loaded"], got["flood"]
    extra: dict[str, Any] = {}
    if without_fairness:
        with _fifo_queues():
            unfair = await _loaded(url, min(jobs, 5), flooders, accounts, flood_latency_s, pause_s, False)
        ul50, ll50 = percentile(unfair["unloaded"], 50), percentile(unfair["loaded"], 50)
        extra |= {
            "unfair_loaded_p50_ms": round(ll50, 2),
            "unfair_ratio": round(ll50 / ul50, 3),
            # the first of the other user's jobs waits for a flood call to end; later ones may
            # find slots freed by the flood's batch ending together: the worst job tells
            "unfair_loaded_max_ms": round(max(unfair["loaded"]), 2),
            "unfair_other_failed": unfair["failed"],
        }
    if without_limits:
        ms, status = await _unprotected(url)
        extra |= {"unprotected_other_ms": round(ms, 1), "unprotected_other_status": status}
    u50, l50 = percentile(unloaded, 50), percentile(loaded, 50)
    u95, l95 = percentile(unloaded, 95), percentile(loaded, 95)
    return {
        "jobs": jobs,
        "limit": LIMIT,
        "flooders": flooders,
        "accounts": accounts,
        "flood_latency_s": flood_latency_s,
        "unloaded_p50_ms": round(u50, 2),
        "loaded_p50_ms": round(l50, 2),
        "ratio": round(l50 / u50, 3),
        "unloaded_p95_ms": round(u95, 2),
        "loaded_p95_ms": round(l95, 2),
        "p95_ratio": round(l95 / u95, 3),
        "loaded_max_ms": round(max(loaded), 2),
        "other_failed": got["failed"],
        "flood_accepted": flood.accepted,
        "flood_refused": flood.refused,
        "flood_errors": flood.errors,
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench fairshare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument("--jobs", type=int, default=50, help="jobs of the other user per phase (default 50)")
    p.add_argument("--flooders", type=int, default=4, help="concurrent submit loops of the flooder (default 4)")
    p.add_argument("--flood-latency", type=float, default=20.0, help="latency per expert call of the flood's jobs (default 20)")
    p.add_argument("--flood-pause", type=float, default=0.05, help="a flood loop's pause after a 429, seconds (default 0.05)")
    p.add_argument("--without-limits", action="store_true", help="also measure the same flood with no fair share")
    p.add_argument("--accounts", type=int, default=1, help="flooder accounts, each at its job limit (default 1)")
    p.add_argument(
        "--without-fairness",
        action="store_true",
        help="also measure the same flood with FIFO queues and no reserved provider slots (at most 5 jobs)",
    )
    a = p.parse_args(argv)
    if a.accounts < 1 or a.jobs < 1:
        p.error("--accounts and --jobs must be at least 1")
    # one line per request or per job without memory/learning pods would drown the result
    for name, level in (("httpx", logging.WARNING), ("aiwfe.helios", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    with nats_server(a.url) as url:
        result = asyncio.run(
            run(url, a.jobs, a.flooders, a.flood_latency, a.flood_pause, a.without_limits, a.accounts, a.without_fairness)
        )
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
