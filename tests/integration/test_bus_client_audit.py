"""The bus against nats-py 2.16's races around PONGs, unsubscribing, its buffer and its fetch
(an audit after the flush fix of ``test_bus_client_flush.py``).

* A flush given up on (timed out, or its task cancelled) left its future in nats-py's PONG
  list; the late PONG set the result of the cancelled future, the InvalidStateError ended the
  read loop, and the connection read nothing more until the stale-connection check (15 to 20 s
  with NatsBus's settings): every message lost, every call timed out. It failed every time.
* ``unsubscribe()`` of a request server (``subscribe_requests``, what ``NatsBus.serve`` uses and
  ``stop_taking_work`` unsubscribes) forgot the subscription before the server had the UNSUB:
  requests already routed to it were dropped, their callers waited out their deadline while
  the other member of the queue group was there. Under load most stops lost requests (up to
  13 each); every run of the test failed.
* Past ``max_pending_size`` (a server that reads slower than we write) a publish waits for
  the flusher inside nats-py's ``_flush_pending``, which swallowed CancelledError: an
  ``asyncio.timeout`` around a publish to a stalled server never fired. It failed every time.
* While reconnecting, nats-py keeps what is published in a bounded buffer and raises its own
  OutboundBufferLimitError once it is full; ``NatsBus.publish`` and ``request`` let it through
  (a foreign error for the kernel's callers, a revocation or a cancel, not the retryable
  Unavailable a lost connection is).
* nats-py's fetch first empties its queue whatever the batch, so messages an abandoned pull
  request left there came with the next fetch: the job consumer ran more deliveries than its
  concurrency and released slots it never took (peak 5 against 2 in the test, every run);
  what is past the free slots is now held and run in turn, as its first attempt.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import nats.errors
import pytest

from aiwfe.bus._client import FastClient
from aiwfe.bus.base import ConsumerOptions
from aiwfe.bus.errors import NotConnected
from aiwfe.bus.nats import NatsBus
from aiwfe.bus.wheel import DeadlineWheel
from aiwfe.kernel.tools.embedded import EmbeddedNats
from tests.support.fastclient import connect_fast

pytestmark = pytest.mark.integration

STOPS = 8


async def test_a_flush_given_up_on_leaves_the_connection_reading(nats_url: str, prefix: str) -> None:
    nc = await connect_fast(nats_url)
    other = await connect_fast(nats_url)
    got: list[bytes] = []
    try:
        await nc.subscribe_raw(f"{prefix}.x", lambda s, h, d: got.append(d))
        await nc.flush()
        flush = asyncio.get_running_loop().create_task(nc.flush(timeout=5))
        await asyncio.sleep(0)  # its PING is sent; cancelled before the PONG comes back
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        await nc.flush(timeout=2)  # the late PONG comes first, then this one's (before the fix: no reader)
        assert nc._reading_task is not None and not nc._reading_task.done()
        await other.publish(f"{prefix}.x", b"after")
        await other.flush()
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [b"after"]
    finally:
        await nc.close()
        await other.close()


async def _stop_under_load(url: str, subject: str) -> tuple[int, int]:
    """Two request servers in a queue group, 20 callers; one server unsubscribes. (lost, calls)"""
    a, b, caller = await connect_fast(url), await connect_fast(url), await connect_fast(url)

    def server(nc: FastClient) -> object:
        def on_request(reply: bytes, headers: bytes, data: bytes) -> None:
            asyncio.get_running_loop().create_task(nc.publish_checked(reply.decode(), "", data))

        return on_request

    sub_a = await a.subscribe_requests(subject, "q", server(a))  # type: ignore[arg-type]
    await b.subscribe_requests(subject, "q", server(b))  # type: ignore[arg-type]
    await a.flush()
    await b.flush()
    wheel = DeadlineWheel()
    lost = calls = 0
    stop = False

    async def load() -> None:
        nonlocal lost, calls
        while not stop:
            try:
                await caller.call(subject, b"x", 1.0, wheel)
            except nats.errors.TimeoutError:
                lost += 1
            calls += 1

    try:
        tasks = [asyncio.get_running_loop().create_task(load()) for _ in range(20)]
        await asyncio.sleep(0.1)
        await sub_a.unsubscribe()
        assert a._request_subs == {}  # nothing left of it once unsubscribe returns
        await asyncio.sleep(0.1)
        stop = True
        await asyncio.gather(*tasks)
    finally:
        for nc in (a, b, caller):
            await nc.close()
    return lost, calls


async def test_a_request_server_answers_what_reached_it_before_its_unsubscribe(nats_url: str, prefix: str) -> None:
    lost = [await _stop_under_load(nats_url, f"{prefix}.r{i}") for i in range(STOPS)]
    assert all(n > 0 for _, n in lost)
    assert [n for n, _ in lost] == [0] * STOPS


async def test_a_timeout_fires_while_a_publish_waits_for_a_stalled_server(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()  # the test's own: it is stopped (SIGSTOP)
    nc = FastClient()

    async def quiet(e: Exception) -> None:
        pass

    await nc.connect(servers=[server.url], error_cb=quiet, pending_size=256 * 1024)

    async def publish_for_half_a_second() -> None:
        async with asyncio.timeout(0.5):
            for _ in range(200):  # 12 MB: far past the buffer, and an end once the server reads again
                await nc.publish("audit.stalled", b"x" * 60_000)

    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    task = asyncio.get_running_loop().create_task(publish_for_half_a_second())
    try:
        done, _ = await asyncio.wait({task}, timeout=3)
        assert task in done, "the timeout did not fire: the cancellation was swallowed"
        assert isinstance(task.exception(), TimeoutError)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        task.cancel()  # before the fix the cancellation is swallowed too: the loop ends on its own
        await asyncio.wait({task}, timeout=10)
        try:
            await nc.close()
        finally:
            server.kill()


async def test_a_lost_connection_with_its_buffer_full_is_a_bus_error(tmp_path: Path) -> None:
    """nats-py raises OutboundBufferLimitError once the buffer it keeps while reconnecting is
    full; NatsBus turns it into NotConnected (Unavailable for the kernel's callers), like a
    closed connection, instead of letting a client library's error through."""
    server = EmbeddedNats(tmp_path / "nats").start()
    bus = NatsBus(server.url, "lost", connect_timeout_s=5, manage_streams=False)
    await bus.start()
    try:
        server.kill()
        async with asyncio.timeout(10):
            while bus._conn().is_connected:
                await asyncio.sleep(0.01)
        chunk = b"x" * 500_000
        with pytest.raises(NotConnected, match="unusable"):
            for _ in range(10):  # 5 MB against nats-py's 2 MiB buffer
                await bus.publish("lost.x", chunk)
        with pytest.raises(NotConnected, match="unusable"):
            await bus.request("lost.call", chunk, None, 1.0)  # a kernel call: FastClient.call
        with pytest.raises(NotConnected, match="unusable"):
            await bus.request("lost.req", chunk, {"A": "b"}, 1.0)  # with headers: nats-py's request
    finally:
        await bus.close()
        server.kill()


@pytest.mark.parametrize(
    ("concurrency", "run_s", "ack_wait_s"),
    [(2, 0.05, 30.0), (1, 0.4, 1.0)],
    ids=["bound", "held-past-the-ack-wait"],
)
async def test_a_fetch_that_hands_over_more_than_asked_never_runs_more_than_the_concurrency(
    nats_url: str, prefix: str, concurrency: int, run_s: float, ack_wait_s: float
) -> None:
    """nats-py's fetch first empties the pull subscription's queue, whatever the batch, then asks
    the server for ``batch - taken`` more (at least one, the server makes a batch under 1 one).
    The queue holds what a pull request left open delivered after its fetch returned: here such
    a request is made by hand before the loop's first fetch.

    What is past the free slots is held and run in turn, each delivery once and as its first
    attempt. Giving it back with a nak instead (the first fix) counted an attempt it never had;
    CI's placement suite saw ``attempts == 2`` for a job that ran once. In the second case the
    last held delivery waits 1.2 s against an ack wait of 1 s: without the in-progress signal
    while held, the server delivers it again (attempt 2, run twice)."""
    bus = NatsBus(nats_url, prefix, name="greedy")
    await bus.start()
    bind = bus.js.pull_subscribe_bind
    left: list[int] = []

    async def bind_with_leftovers(*args: Any, **kwargs: Any) -> Any:
        psub = await bind(*args, **kwargs)
        await bus._conn().publish(psub._nms, b'{"batch": 4, "no_wait": true}', reply=psub._deliver)
        async with asyncio.timeout(5):
            while psub._sub._pending_queue.qsize() < 4:
                await asyncio.sleep(0.01)
        left.append(psub._sub._pending_queue.qsize())
        return psub

    bus.js.pull_subscribe_bind = bind_with_leftovers
    running = peak = 0
    runs: list[tuple[bytes, int]] = []

    async def handler(d: Any) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(run_s)
            runs.append((d.data, d.attempt))
            await d.ack()
        finally:
            running -= 1

    try:
        await bus.accept_kinds(["greedy"])
        for i in range(6):
            assert await bus.enqueue("greedy", b"%d" % i, {}, f"{prefix}-{i}")
        await bus.consume("greedy", ConsumerOptions(concurrency=concurrency, ack_wait_s=ack_wait_s), handler)
        async with asyncio.timeout(15):
            while len(runs) < 6:
                await asyncio.sleep(0.02)
        await asyncio.sleep(ack_wait_s if ack_wait_s < 5 else 0.2)  # time for a redelivery to show
        assert left == [4]  # the loop's first fetch found 4 deliveries queued
        assert peak <= concurrency
        assert sorted(runs) == sorted((b"%d" % i, 1) for i in range(6))
    finally:
        await bus.close()
