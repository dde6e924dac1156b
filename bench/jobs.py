"""``aiwfe bench jobs``: durable job throughput through the kernel against raw nats-py JetStream.

One job = submit, run a no-op, record the outcome, ack. Both paths run closed loops of
``--inflight`` clients, each submitting a job and waiting for its outcome record before
submitting the next, so throughput and submit-to-outcome latency are measured together:

* **kernel**: a submitter pod and a worker pod (two PodRunners, two NATS connections, the
  no-op plugin of :mod:`aiwfe.bench._noop`); ``kernel.submit`` → the jobs stream → the
  worker's pull consumer → the handler → the create-once outcome record, the ``job.done``
  event, the ack (:mod:`aiwfe.kernel.jobs`);
* **raw**: nats-py alone on two connections: a work-queue stream, one durable pull consumer,
  ``js.publish`` with ``Nats-Msg-Id``, one KV ``create`` per message, ack;
* **raw, same work**: raw nats-py doing what the kernel's semantics add per job (the
  terminal event between the record and the ack; a first delivery reads no record, see
  :meth:`aiwfe.kernel.jobs.Jobs.process`): ``same_work_ratio``;
* **auth**: the kernel path again on a nats-server with authorization on (a user per pod
  with its least-privilege permissions, rendered by :mod:`aiwfe.kernel.tools.natsauth` as
  ``aiwfe up`` does), against the kernel path on one with it off; both
  private embedded servers started here, whatever ``--url`` says (``auth_ratio`` = on / off).

A job's outcome is seen when its record is written: the clients watch the bucket's subject
(``$KV.<bucket>.>``) on a connection of their own, the same way for both paths. Rounds
alternate the paths so that drift on a shared machine hits them alike; each figure is the
mean of the rounds, latencies are over all rounds. Last line: one JSON object
``{"jobs", "kernel_per_s", "raw_per_s", "ratio", "p50_ms", "p99_ms", "auth_ratio", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from ._support import emit, nats_server, percentile

if TYPE_CHECKING:
    from aiwfe.kernel.manifest import Manifest

#: the subject prefix on the server with authorization on (a private server: nothing else on it)
AUTH_PREFIX = "bjauth"

#: submit one job with this id (the path's own way); the outcome arrives on the bucket's subject
Submit = Callable[[str], Awaitable[None]]


class Outcomes:
    """Futures of the jobs in flight, resolved when their record appears on the bucket."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}

    def expect(self, job_id: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[job_id] = fut
        return fut

    async def on_record(self, msg: Any) -> None:
        fut = self.waiting.pop(msg.subject.rsplit(".", 1)[-1], None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())


async def closed_loop(submit: Submit, outcomes: Outcomes, jobs: int, inflight: int) -> tuple[float, list[float]]:
    """Run ``jobs`` jobs with ``inflight`` clients; return (jobs/s, latencies in ms)."""
    left = jobs
    latencies: list[float] = []

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            job_id = uuid.uuid4().hex
            fut = outcomes.expect(job_id)
            t0 = time.perf_counter()
            await submit(job_id)
            t1 = await asyncio.wait_for(fut, 30.0)
            latencies.append((t1 - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(inflight)))
    return jobs / (time.perf_counter() - start), latencies


@contextlib.asynccontextmanager
async def watching(url: str, bucket: str, outcomes: Outcomes) -> AsyncIterator[None]:
    """A connection of its own subscribed to the bucket's subject."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.subscribe(f"$KV.{bucket}.>", cb=outcomes.on_record, pending_msgs_limit=1_000_000)
        await nc.flush()
        yield
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def kernel_path(url: str, worker_url: str, prefix: str) -> AsyncIterator[tuple[Submit, str]]:
    """Submitter and worker pods on their own connections; yields (submit, bucket)."""
    from aiwfe.bench._noop import Noop
    from aiwfe.bus.codec import stream_names
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.pod import PodRunner

    manifest = bench_manifest(prefix)
    worker = PodRunner(manifest, "worker", NatsBus(worker_url, prefix, name="bench-worker"), ops_port=0)
    submitter = PodRunner(manifest, "submitter", NatsBus(url, prefix, name="bench-submitter"), ops_port=0)
    await worker.start()
    await submitter.start()
    kernel = submitter.kernel
    job = Noop(n=1)

    async def submit(job_id: str) -> None:
        await kernel.submit(job, job_id=job_id)

    try:
        yield submit, stream_names(prefix)["results"]
    finally:
        await submitter.stop()
        await worker.stop()


@contextlib.asynccontextmanager
async def raw_path(
    url: str, prefix: str, concurrency: int = 256, *, same_work: bool = False
) -> AsyncIterator[tuple[Submit, str]]:
    """nats-py JetStream alone: work queue, pull consumer, a KV create per message, ack.

    ``same_work``: also what the kernel's semantics add per job, still with nats-py alone: a
    terminal event on an events stream between the record and the ack.
    """
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api

    stream, bucket, subject = f"{prefix.upper()}_RAWJOBS", f"{prefix.upper()}_RAWRESULTS", f"{prefix}.rawjobs.noop"
    pub = await nats.connect(url)
    sub = await nats.connect(url)
    js_pub, js_sub = pub.jetstream(), sub.jetstream()
    await js_sub.add_stream(
        api.StreamConfig(name=stream, subjects=[subject], retention=api.RetentionPolicy.WORK_QUEUE, duplicate_window=120.0)
    )
    kv = await js_sub.create_key_value(bucket=bucket, history=1, direct=True)
    events = f"{prefix}.rawevents"
    if same_work:
        await js_sub.add_stream(api.StreamConfig(name=f"{prefix.upper()}_RAWEVENTS", subjects=[f"{events}.>"]))
    await js_sub.add_consumer(
        stream, api.ConsumerConfig(durable_name="raw", ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=4096)
    )
    psub = await js_sub.pull_subscribe_bind(durable="raw", stream=stream)
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: Any) -> None:
        job_id = msg.headers["Nats-Msg-Id"]
        try:
            await kv.create(job_id, b"done")
            if same_work:
                await js_sub.publish(f"{events}.{job_id}", b"\x81\xa1n\x01", headers={"Aiwfe-Type": "job.done"})
            await msg.ack()
        finally:
            slots.release()

    async def fetch_loop() -> None:
        while True:
            await slots.acquire()
            free = 1
            while free < 64 and not slots.locked():
                await slots.acquire()
                free += 1
            try:
                msgs = await psub.fetch(batch=free, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            for _ in range(free - len(msgs)):
                slots.release()
            for m in msgs:
                t = asyncio.get_running_loop().create_task(handle(m))
                tasks.add(t)
                t.add_done_callback(tasks.discard)

    loop_task = asyncio.get_running_loop().create_task(fetch_loop())
    payload = b"\x81\xa1n\x01"  # msgpack {"n": 1}, the kernel's Noop(n=1)

    async def submit(job_id: str) -> None:
        await js_pub.publish(subject, payload, headers={"Nats-Msg-Id": job_id}, timeout=5.0)

    try:
        yield submit, bucket
    finally:
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await pub.close()
        await sub.close()


# -- authorization on: the manifest's users, rendered by aiwfe.kernel.tools.natsauth --------


def bench_manifest(prefix: str) -> Manifest:
    """The two pods of the kernel path under ``prefix``."""
    from aiwfe.kernel.manifest import parse_manifest

    return parse_manifest(
        f"""
        [system]
        subject_prefix = "{prefix}"
        [pods.worker]
        plugins = ["aiwfe.bench._noop:NoopWorkerPlugin"]
        [pods.submitter]
        plugins = ["aiwfe.bench._noop:NoopSubmitterPlugin"]
        """,
        env={},
    )


@contextlib.contextmanager
def auth_server(prefix: str) -> Iterator[dict[str, str]]:
    """A private nats-server with authorization on, as ``aiwfe up`` runs it: one least-privilege
    user per pod of :func:`bench_manifest` (:func:`aiwfe.kernel.tools.natsauth.permissions`),
    plus ``watch``, which may only subscribe to the bucket's subject (how the clients see
    outcomes). Yields user → URL with its credentials."""
    from aiwfe.kernel.tools import natsauth
    from aiwfe.kernel.tools.embedded import EmbeddedNats

    perms = natsauth.permissions(bench_manifest(prefix))
    perms["watch"] = natsauth.Permissions(publish=("_INBOX.watch.>",), subscribe=("$KV.>",))
    passwords = {u: secrets.token_urlsafe(24) for u in perms}
    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-auth-") as d:
        with EmbeddedNats(os.path.join(d, "nats"), config=natsauth.render_config(perms, passwords)) as srv:
            yield {u: natsauth.user_url(srv.url, u, p) for u, p in passwords.items()}


# -- the run ------------------------------------------------------------------------------


async def remove_streams(url: str, prefixes: list[str]) -> None:
    """Delete the streams and buckets the paths created under ``prefixes`` (``--url`` may name a
    shared server: the benchmark leaves nothing behind)."""
    import nats

    from aiwfe.bus.codec import stream_names

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        for p in prefixes:
            n, up = stream_names(p), p.upper()
            names = [n["jobs"], n["events"], n["dlq"], f"KV_{n['results']}"]
            for name in [*names, f"{up}_RAWJOBS", f"{up}_RAWEVENTS", f"KV_{up}_RAWRESULTS"]:
                with contextlib.suppress(Exception):
                    await js.delete_stream(name)
    finally:
        await nc.close()


async def run(url: str, private_url: str, auth_urls: dict[str, str], jobs: int, inflight: int, rounds: int) -> dict[str, Any]:
    """Set the paths up, then alternate them for ``rounds`` rounds of ``jobs`` jobs each.

    ``private_url``: the private embedded server without authorization that ``auth_ratio``
    compares against (``url`` itself unless ``--url`` named another server).
    """
    prefix = f"bj{int(time.time() * 1000) % 10**8}"
    paths = {
        "raw": (raw_path(url, f"{prefix}r"), url),
        "raw_same": (raw_path(url, f"{prefix}s", same_work=True), url),
        "kernel": (kernel_path(url, url, f"{prefix}k"), url),
        "auth": (kernel_path(auth_urls["pod-submitter"], auth_urls["pod-worker"], AUTH_PREFIX), auth_urls["watch"]),
    }
    if private_url != url:
        paths["auth_off"] = (kernel_path(private_url, private_url, f"{prefix}p"), private_url)
    rates: dict[str, list[float]] = {name: [] for name in paths}
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(remove_streams, url, [f"{prefix}r", f"{prefix}s", f"{prefix}k"])
        loops = {}
        for name, (path, watch_url) in paths.items():
            submit, bucket = await stack.enter_async_context(path)
            outcomes = Outcomes()
            await stack.enter_async_context(watching(watch_url, bucket, outcomes))
            loops[name] = (submit, outcomes)
            await closed_loop(submit, outcomes, max(inflight, jobs // 5), inflight)  # warm-up
        for _ in range(rounds):
            for name, (submit, outcomes) in loops.items():
                rate, lat = await closed_loop(submit, outcomes, jobs, inflight)
                rates[name].append(rate)
                latencies[name] += lat
    mean = {name: sum(r) / len(r) for name, r in rates.items()}
    raw, same, kernel, auth = mean["raw"], mean["raw_same"], mean["kernel"], mean["auth"]
    return {
        "jobs": jobs,
        "kernel_per_s": round(kernel),
        "raw_per_s": round(raw),
        "ratio": round(kernel / raw, 3),
        "p50_ms": round(percentile(latencies["kernel"], 50), 2),
        "p99_ms": round(percentile(latencies["kernel"], 99), 2),
        "auth_ratio": round(auth / mean.get("auth_off", kernel), 3),
        "auth_per_s": round(auth),
        "raw_same_work_per_s": round(same),
        "same_work_ratio": round(kernel / same, 3),
        "raw_p50_ms": round(percentile(latencies["raw"], 50), 2),
        "raw_p99_ms": round(percentile(latencies["raw"], 99), 2),
        "inflight": inflight,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench jobs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="NATS URL for the unauthenticated runs (default: a private embedded nats-server)")
    p.add_argument("--jobs", type=int, default=2000, help="jobs per path per round (default 2000)")
    p.add_argument("--inflight", type=int, default=64, help="clients, each with one job in flight (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each running every path in turn (default 5)")
    a = p.parse_args(argv)
    with nats_server(None) as private_url, auth_server(AUTH_PREFIX) as auth_urls:
        result = asyncio.run(run(a.url or private_url, private_url, auth_urls, a.jobs, a.inflight, a.rounds))
    emit(result)
    return 0
