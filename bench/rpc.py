"""``aiwfe bench rpc``: the kernel's call paths against raw nats-py in the same run.

Measures, on one NATS server (a private embedded one unless ``--url``):

* raw nats-py request/reply: 256 in flight (``raw_rps``) and one at a time (``raw_p50_us``);
* the kernel's remote path, caller and server in different pods (two kernels, two
  connections, nothing shared in-process): ``kernel_rps``, ``kernel_p50_us``;
* FastStream's request/reply on the same server (for the record: why the hot path is nats-py);
* the kernel's local path (``local_call_us``) and a plain ``await`` (``await_us``).

Throughput rounds alternate raw and kernel so that drift hits both alike; each figure
is the mean of the rounds. Last line: one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ._support import emit, nats_server, percentile

PAYLOAD_TEXT = "x" * 64


async def _throughput(fn: Callable[[], Awaitable[Any]], inflight: int, seconds: float) -> float:
    count = 0
    stop = False

    async def worker() -> None:
        nonlocal count
        while not stop:
            await fn()
            count += 1

    tasks = [asyncio.create_task(worker()) for _ in range(inflight)]
    await asyncio.sleep(0.3)  # warm-up
    c0, t0 = count, time.perf_counter()
    await asyncio.sleep(seconds)
    c1, t1 = count, time.perf_counter()
    stop = True
    await asyncio.gather(*tasks)
    return (c1 - c0) / (t1 - t0)


async def _latency_us(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(200):
        await fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return percentile(samples, 50)


async def _per_call_us(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    for _ in range(1000):
        await fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            await fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


async def run(url: str, seconds: float, rounds: int, inflight: int, faststream: bool) -> dict[str, Any]:
    import nats

    from aiwfe.bench._echo import Echo
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner

    prefix = f"bench{int(time.time() * 1000) % 10**8}"
    payload = msgspec.msgpack.encode(Echo(text=PAYLOAD_TEXT))

    # raw nats-py: its own two connections
    srv = await nats.connect(url)
    cli = await nats.connect(url)

    async def on_raw(msg: Any) -> None:
        await msg.respond(msg.data)

    await srv.subscribe(f"{prefix}.raw", queue=f"{prefix}.raw", cb=on_raw)
    await srv.flush()
    raw_subject = f"{prefix}.raw"

    async def raw_call() -> Any:
        return await cli.request(raw_subject, payload, timeout=5)

    # kernel: server pod and caller pod, each with its own NatsBus connection
    manifest = parse_manifest(
        f"""
        [system]
        subject_prefix = "{prefix}"
        [pods.server]
        plugins = ["aiwfe.bench._echo:EchoPlugin"]
        [pods.client]
        plugins = ["aiwfe.bench._echo:CallerPlugin"]
        """
    )
    server = PodRunner(manifest, "server", NatsBus(url, prefix), ops_port=0)
    client = PodRunner(manifest, "client", NatsBus(url, prefix), ops_port=0)
    await server.start()
    await client.start()
    req = Echo(text=PAYLOAD_TEXT)
    remote_kernel = client.kernel
    local_kernel = server.kernel

    async def kernel_call() -> Any:
        return await remote_kernel.call(req, timeout_s=5)

    raw_rps_rounds, kernel_rps_rounds = [], []
    for _ in range(rounds):
        raw_rps_rounds.append(await _throughput(raw_call, inflight, seconds))
        kernel_rps_rounds.append(await _throughput(kernel_call, inflight, seconds))
    raw_p50 = await _latency_us(raw_call, 3000)
    kernel_p50 = await _latency_us(kernel_call, 3000)
    raw_p50 = min(raw_p50, await _latency_us(raw_call, 3000))
    kernel_p50 = min(kernel_p50, await _latency_us(kernel_call, 3000))

    async def local_call() -> Any:
        return await local_kernel.call(req)

    async def plain(x: Any) -> Any:
        return x

    async def plain_call() -> Any:
        return await plain(req)

    local_us = await _per_call_us(local_call, 50_000)
    await_us = await _per_call_us(plain_call, 50_000)

    fs_rps = None
    if faststream:
        fs_rps = await _faststream_rps(url, prefix, payload, inflight, seconds)

    await client.stop()
    await server.stop()
    await cli.close()
    await srv.close()
    raw_rps = sum(raw_rps_rounds) / len(raw_rps_rounds)
    kernel_rps = sum(kernel_rps_rounds) / len(kernel_rps_rounds)
    out: dict[str, Any] = {
        "raw_rps": round(raw_rps),
        "kernel_rps": round(kernel_rps),
        "rps_ratio": round(kernel_rps / raw_rps, 3),
        "raw_p50_us": round(raw_p50, 1),
        "kernel_p50_us": round(kernel_p50, 1),
        "p50_ratio": round(kernel_p50 / raw_p50, 3),
        "local_call_us": round(local_us, 2),
        "await_us": round(await_us, 3),
        "inflight": inflight,
    }
    if fs_rps is not None:
        out["faststream_rps"] = round(fs_rps)
        out["faststream_ratio"] = round(fs_rps / raw_rps, 3)
    return out


async def _faststream_rps(url: str, prefix: str, payload: bytes, inflight: int, seconds: float) -> float:
    from faststream.nats import NatsBroker

    broker = NatsBroker(url, logger=None)
    subject = f"{prefix}.fs"

    @broker.subscriber(subject, queue=subject)
    async def echo(body: bytes) -> bytes:
        return body

    await broker.start()
    try:

        async def call() -> Any:
            return await broker.request(payload, subject, timeout=5)

        return await _throughput(call, inflight, seconds)
    finally:
        await broker.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print the JSON line."""
    p = argparse.ArgumentParser(prog="aiwfe bench rpc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="NATS URL (default: a private embedded nats-server)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of one throughput round (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="throughput rounds per path (default 2)")
    p.add_argument("--inflight", type=int, default=256, help="requests in flight for throughput (default 256)")
    p.add_argument("--no-faststream", action="store_true", help="skip the FastStream comparison")
    a = p.parse_args(argv)
    with nats_server(a.url) as url:
        result = asyncio.run(run(url, a.seconds, a.rounds, a.inflight, not a.no_faststream))
    emit(result)
    return 0
