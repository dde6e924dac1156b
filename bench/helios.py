"""``aiwfe bench helios``: parallel experts against a sequential baseline in the same run.

With the extractive provider and a simulated latency L per expert call:

* one job consulting 12 experts (goal: job time ≤ L + 0.3 s) against the same 12 expert
  calls made one after another through the kernel (the old system's shape, ≈ 12·L);
* the time from a WebSocket client's submit frame to the job's first event frame on the
  same socket (``first_event_ms``, through the gateway; ``first_event_kernel_ms`` is the
  same seen from the kernel's job event stream; ``first_event_ratio`` the first over the second);
* the same job again with a warm answer cache (``cached_ms``; needs Redis: ``REDIS_URL``,
  else an embedded Valkey when available);
* ``--concurrent`` jobs at once with latency ``--concurrent-latency`` (goal: all complete,
  p95 ≤ 2·L; ``concurrent_p95_per_latency`` is p95 / L), with the CPU they cost: the pod
  processes' (``concurrent_cpu_ms_per_job``) and nats-server's (``concurrent_nats_cpu_ms_per_job``).

The bench's pod runs as ``--processes`` replicas: one in this process and the others as
child processes, on a private embedded nats-server (or ``--url``). A pod replica is a
process, as in a deployment, and one process uses one core: the default is one replica per
core, up to 2 (the consolidated manifest serves ``helios.ask`` from two pods); ``--processes
1`` runs every job in this process, the shape before. The jobs are shared by the replicas'
consumers of the jobs stream; an expert call is served in its job's own process.
The concurrent phase learns that a job ended from its one record in the results bucket
(a core subscription to the bucket's subjects), not from every event of every job, so the
measurement costs the pods' cores as little as it can; the single-job phases follow events.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from ._support import cpu_s, emit, nats_pid, nats_server, percentile, stop_children

TERMINAL = ("job.done", "job.failed", "job.cancelled")  # aiwfe.kernel.jobs.TERMINAL (imported late there)

ALL_TAGS = (
    "Review the architecture, security, database, performance, deploy pipeline, frontend page, backend api, "
    "data, model training, test coverage, user feature and docs of the system"
)
CONTEXT_NOTE = "The system has a database, an api and a deploy pipeline."

MANIFEST = """
[system]
subject_prefix = "{prefix}"
[system.jobs."helios.ask"]
caps = {{ max_experts = 12, latency_s = 60 }}  # the WebSocket client's jobs: 12 experts, simulated latency
[pods.all]
plugins = ["helios", "perception", "reasoning", "aiwfe.bench.ws:BenchAuthPlugin", "gateway"]
[pods.all.handlers."reasoning.reason"]
concurrency = 8192
max_queue = 65536
[pods.all.handlers."helios.ask"]
concurrency = 1024
[plugins.reasoning]
max_concurrency = 8192
reserved_slots = 0  # one owner's jobs here: no slots kept back for light owners
[plugins.gateway]
port = 0
job_kinds = {{ helios = "helios.ask" }}
[plugins.helios]
redis_url = "{redis}"
cache_prefix = "{prefix}:"
"""


@contextlib.contextmanager
def _redis(url: str | None) -> Any:
    if url:
        yield url
        return
    try:
        from aiwfe.kernel.tools.embedded_db import EmbeddedValkey
    except ImportError:
        yield ""
        return
    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-") as d, EmbeddedValkey(os.path.join(d, "valkey")) as v:
        yield v.url


@contextlib.asynccontextmanager
async def _system(url: str, prefix: str, redis: str) -> AsyncIterator[Any]:
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner

    m = parse_manifest(MANIFEST.format(prefix=prefix, redis=redis), env={})
    async with PodRunner(m, "all", NatsBus(url, prefix, name="bench-helios"), ops_port=0) as pod:
        yield pod


class _Tap:
    """Watches every job event with a core NATS subscription (no consumer per job)."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, asyncio.Future[str]] = {}

    def waiter(self, job_id: str) -> asyncio.Future[str]:
        fut = self.done.get(job_id)
        if fut is None:
            fut = self.done[job_id] = asyncio.get_running_loop().create_future()
        return fut

    def on_msg(self, subject: bytes, headers: bytes, data: bytes) -> None:
        """Called from the client's read loop (``FastClient.subscribe_raw``): the tap should
        cost the measurement as little as it can, so it reads the raw header block."""
        job_id = subject.rsplit(b".", 1)[1].decode()
        self.first.setdefault(job_id, time.perf_counter())
        i = headers.find(b"Aiwfe-Type: job.")
        if i >= 0:
            typ = headers[i + 12 : headers.index(b"\r\n", i)].decode()
            if typ in TERMINAL:  # not job.retrying / job.replayed: the job goes on
                fut = self.waiter(job_id)
                if not fut.done():
                    fut.set_result(typ)


class _Records:
    """Watches the results bucket's subjects: one message per job, its record (module doc)."""

    def __init__(self) -> None:
        from aiwfe.kernel.jobs import JobRecord

        self._dec = msgspec.msgpack.Decoder(JobRecord)
        self.done: dict[str, asyncio.Future[Any]] = {}

    def waiter(self, job_id: str) -> asyncio.Future[Any]:
        fut = self.done[job_id] = asyncio.get_running_loop().create_future()
        return fut

    def on_msg(self, subject: bytes, headers: bytes, data: bytes) -> None:
        fut = self.done.pop(subject.rsplit(b".", 1)[1].decode(), None)
        if fut is not None and not fut.done() and data:
            fut.set_result(self._dec.decode(data))


async def _job_time(k: Any, tap: _Tap, ask: Any) -> tuple[float, float, Any]:
    """(seconds from submit to done, ms from submit to the first event, record)."""
    import uuid

    job_id = uuid.uuid4().hex
    fut = tap.waiter(job_id)
    t0 = time.perf_counter()
    await k.submit(ask, job_id=job_id)
    await asyncio.wait_for(fut, 600)
    t1 = time.perf_counter()
    rec = await k.job_record(job_id)
    return t1 - t0, (tap.first[job_id] - t0) * 1000, rec


async def run(
    url: str, prefix: str, latency_s: float, concurrent: int, concurrent_latency_s: float, redis: str, replicas: list[int]
) -> dict[str, Any]:
    """Every phase; ``replicas``: the pids of the pod's other replicas (already serving)."""
    from aiwfe.plugins.helios.contract import Ask
    from aiwfe.plugins.helios.experts import DEFAULT_EXPERTS
    from aiwfe.plugins.reasoning.contract import Reason

    question = f"{ALL_TAGS} ({prefix})"  # a question no earlier run has cached
    async with _system(url, prefix, redis) as pod:
        k = pod.kernel
        tap = _Tap()
        events_sub = await k.bus.nc.subscribe_raw(f"{prefix}.events.*", tap.on_msg)
        for i in range(2 * (len(replicas) + 1)):  # one after another: the replicas' waiting fetches take turns
            await _job_time(k, tap, Ask(text=f"warm-up {i}: connections and decoders", max_experts=12, latency_s=0.0))
        job_s, first_ms, rec = await _job_time(k, tap, Ask(text=question, max_experts=12, latency_s=latency_s))
        result = msgspec.msgpack.decode(rec.result)
        experts = len([e for e in result["experts"] if e["status"] == "answered"])

        t0 = time.perf_counter()
        for e in DEFAULT_EXPERTS:  # the old shape: one expert after another
            await k.call(Reason(role=e.role, task=question, context=[], latency_s=latency_s), timeout_s=60)
        sequential_s = time.perf_counter() - t0

        ws_first_ms = await _ws_first_event_ms(pod, question, latency_s)

        cached_s, _, cached_rec = await _job_time(k, tap, Ask(text=question, max_experts=12, latency_s=latency_s))
        cached_all = all(e["cached"] for e in msgspec.msgpack.decode(cached_rec.result)["experts"]) if redis else False

        import uuid

        records = _Records()
        await events_sub.unsubscribe()  # the concurrent phase watches records only (module doc)
        await k.bus.nc.subscribe_raw(f"$KV.{k.bus.names['results']}.>", records.on_msg)

        async def one(i: int) -> float | None:
            ask = Ask(text=f"{question} #{i}", max_experts=12, latency_s=concurrent_latency_s, use_cache=False)
            job_id = uuid.uuid4().hex
            fut = records.waiter(job_id)
            t0 = time.perf_counter()
            await k.submit(ask, job_id=job_id)
            r = await asyncio.wait_for(fut, 600)
            return time.perf_counter() - t0 if r.status == "done" else None

        pids = [os.getpid(), *replicas]
        nats = nats_pid(url)
        cpu0 = [cpu_s(p) or 0.0 for p in pids]
        nats0 = cpu_s(nats) if nats else None
        times = await asyncio.gather(*(one(i) for i in range(concurrent)))
        pods_cpu = sum((cpu_s(p) or 0.0) - c for p, c in zip(pids, cpu0, strict=True))  # every pod replica and the taps
        nats_cpu = (cpu_s(nats) or 0.0) - nats0 if nats and nats0 is not None else None
        done = [t for t in times if t is not None]
    p95 = percentile(done, 95) if done else None
    return {
        "experts": experts,
        "latency_s": latency_s,
        "job_s": round(job_s, 3),
        "sequential_s": round(sequential_s, 3),
        "first_event_ms": round(ws_first_ms, 1),
        "first_event_kernel_ms": round(first_ms, 1),
        "first_event_ratio": round(ws_first_ms / first_ms, 2) if first_ms else None,
        "cached_ms": round(cached_s * 1000, 1) if cached_all else None,
        "concurrent_jobs": concurrent,
        "concurrent_completed": len(done),
        "concurrent_p95_s": round(p95, 3) if p95 else None,
        "concurrent_latency_s": concurrent_latency_s,
        "concurrent_p95_per_latency": round(p95 / concurrent_latency_s, 2) if p95 and concurrent_latency_s else None,
        "processes": len(replicas) + 1,
        # CPU of the pod replicas (this one with the bench's client and taps, and the others) per job
        "concurrent_cpu_ms_per_job": round(pods_cpu * 1000 / concurrent, 2) if concurrent else None,
        "concurrent_nats_cpu_ms_per_job": round(nats_cpu * 1000 / concurrent, 2) if concurrent and nats_cpu is not None else None,
    }


async def _ws_first_event_ms(pod: Any, question: str, latency_s: float, rounds: int = 5) -> float:
    """Median time from a WebSocket submit frame to the first event frame, through the gateway."""
    import statistics

    import websockets

    from aiwfe.bench.ws import make_token

    url = pod.plugins["gateway"].public_url.replace("http://", "ws://") + "/v1/ws"
    samples = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {make_token('bench')}"}) as ws:
        for i in range(rounds):
            ask = {"text": f"{question} ws{i}", "max_experts": 12, "latency_s": latency_s, "use_cache": False}
            t0 = time.perf_counter()
            await ws.send(msgspec.json.encode({"type": "submit", "kind": "helios", "input": ask, "id": str(i)}).decode())
            first = None
            while True:
                frame = msgspec.json.decode(await ws.recv())
                if frame["type"] == "event" and first is None:
                    first = (time.perf_counter() - t0) * 1000
                if frame["type"] in ("result", "error"):
                    break
            if first is not None:
                samples.append(first)
    return statistics.median(samples) if samples else float("nan")


async def _serve_replica(url: str, prefix: str, redis: str) -> None:
    """One more replica of the bench's pod (``--role replica``): READY, then serve until stdin closes."""
    async with _system(url, prefix, redis):
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


@contextlib.contextmanager
def _replicas(n: int, url: str, prefix: str, redis: str) -> Any:
    """Start ``n`` replica processes and wait until each serves; yield their pids."""
    argv = [sys.executable, "-m", "aiwfe.bench.helios", "--role", "replica", "--url", url, "--prefix", prefix]
    procs = [
        subprocess.Popen([*argv, "--redis-url", redis], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != "READY":
                raise RuntimeError(f"a replica of the bench's pod did not start (exit {p.wait()})")
        yield [p.pid for p in procs]
    finally:
        stop_children(procs)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench helios", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="Redis for the answer cache (default $REDIS_URL, else embedded)"
    )
    p.add_argument("--latency", type=float, default=2.0, help="simulated latency per expert call, seconds (default 2)")
    p.add_argument("--concurrent", type=int, default=200, help="concurrent jobs (default 200)")
    p.add_argument(
        "--concurrent-latency", type=float, default=1.0, help="latency per expert call in the concurrent run (default 1)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="replicas of the bench's pod, one process each (default: one per core, up to 2; 1: all in this process)",
    )
    p.add_argument("--role", choices=["replica"], help=argparse.SUPPRESS)  # a child of this benchmark
    p.add_argument("--prefix", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.processes < 1:
        p.error("--processes must be at least 1")
    if a.role == "replica":
        if not a.url or not a.prefix:
            p.error("--role replica needs --url and --prefix")
        asyncio.run(_serve_replica(a.url, a.prefix, a.redis_url or ""))
        return 0
    prefix = f"benchh{int(time.time() * 1000) % 10**8}"
    with nats_server(a.url) as url, _redis(a.redis_url) as redis, _replicas(a.processes - 1, url, prefix, redis) as pids:
        result = asyncio.run(run(url, prefix, a.latency, a.concurrent, a.concurrent_latency, redis, pids))
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
