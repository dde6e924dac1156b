"""What a client leaves behind when it goes away, measured from outside a real gateway (NATS with
JetStream, the gateway in this process): the user's job slots, the gateway's tasks, the
JetStream consumers on the events stream, file descriptors and the hub's per-user counts.

Clients here leave the hard way: a TCP reset at once after a ``submit`` frame (the submit still
in flight), or a socket kept open that never reads its Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import nats
import pytest

from aiwfe.bus.codec import stream_names
from aiwfe.bus.nats import NatsBus
from aiwfe.plugins.gateway.server import LeanHttp
from tests.support.auth_double import make_token
from tests.support.gateway import GatewaySystem, gateway_manifest, raw_ws_open, raw_ws_send_text, run_system

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

SLOTS = 4  # the user's job slots of probe.crunch in these tests


@contextlib.asynccontextmanager
async def started(prefix: str, nats_url: str) -> AsyncIterator[GatewaySystem]:
    """The one-pod gateway system on NATS (auth double), ``SLOTS`` crunch jobs per user."""
    limits = f'drain_timeout_s = 2\n[system.jobs."probe.crunch"]\nmax_per_owner = {SLOTS}'
    text = gateway_manifest(prefix).replace("drain_timeout_s = 2", limits)
    async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s:
        yield s


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the connection with a TCP reset (no close frame, no FIN)."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def vanish_mid_submit(s: GatewaySystem, token: str, sockets: int, job: dict[str, Any]) -> None:
    """Open ``sockets`` WebSockets, 20 at a time; each sends a ``submit`` of ``job`` and resets
    0–10 ms later (spread evenly), so that the disconnect lands in every phase of the submit."""

    async def one(i: int) -> None:
        _, writer = await raw_ws_open(s.ws_url, token)
        frame = {"type": "submit", "id": str(i), "kind": "crunch", "input": job, "cancel_on_disconnect": True}
        raw_ws_send_text(writer, json.dumps(frame))
        await asyncio.sleep((i % 40) * 0.00025)
        reset(writer)

    for k in range(0, sockets, 20):
        await asyncio.gather(*(one(i) for i in range(k, min(sockets, k + 20))))


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    """Poll ``check`` every 0.2 s until it holds (True) or ``timeout_s`` passed (False)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not await check():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.2)
    return True


async def consumers(nats_url: str, prefix: str) -> int:
    """JetStream consumers on this test's events stream."""
    nc = await nats.connect(nats_url)
    try:
        return len(await nc.jetstream().consumers_info(stream_names(prefix)["events"]))
    finally:
        await nc.close()


async def test_a_user_who_vanishes_mid_submit_gets_every_job_slot_back(prefix: str, nats_url: str) -> None:
    """200 sockets each submit a 20 s job with ``cancel_on_disconnect`` and reset at once; then
    the user must be able to hold all its job slots again within 10 s.

    Failed before (7 of 7 runs; 0 or 1 of the 4 slots could be taken within 10 s): the socket's
    cleanup cancelled a ``submit`` still in flight (commands.py, ``Commands.close``). The kernel
    keeps a cancelled submission's job slot and may have queued its job (kernel/submitting.py,
    ``enqueue``), but the job id never reached ``cancel_on_disconnect``: the job ran its 20 s
    holding a slot, or a slot was held for a job never queued until its lease ran out (30 min)."""
    async with started(prefix, nats_url) as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        token = make_token("vanisher")
        await vanish_mid_submit(s, token, 200, {"n": 1, "delay_s": 20})
        h = {"Authorization": f"Bearer {token}"}
        held = 0

        async def all_slots_taken() -> bool:
            nonlocal held
            r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 2, "delay_s": 20}}, headers=h)
            assert r.status_code in (202, 429), r.text
            held += r.status_code == 202
            return held == SLOTS

        assert await until(all_slots_taken, 10.0), f"only {held} of {SLOTS} job slots free again"
        assert s.gateway.hub.count() == 0 and s.gateway.hub.per_sub == {}


async def test_abruptly_closed_sockets_give_back_tasks_consumers_and_fds(prefix: str, nats_url: str) -> None:
    """200 sockets that submitted and follow a running job each (the jobs emit events for 3 s),
    reset at once: the gateway's tasks, file descriptors and the hub's counts return to what
    they were, and no JetStream consumer stays on the events stream (the server drops an
    ordered consumer ≈ 5 s after its subscription ends).

    A guard: this passed before any change here (tasks +0, fds +0, consumers 0 after ≤ 6 s)."""
    async with started(prefix, nats_url) as s:
        token = make_token("follower")
        tasks0, fds0 = tasks(), len(os.listdir("/proc/self/fd"))
        writers = []
        for k in range(0, 200, 20):
            opened = await asyncio.gather(*(raw_ws_open(s.ws_url, token) for _ in range(20)))
            for i, (_, w) in enumerate(opened):
                job = {"type": "submit", "id": str(k + i), "kind": "spew", "input": {"count": 30, "every_s": 0.1}}
                raw_ws_send_text(w, json.dumps(job))
                writers.append(w)
        assert await until(lambda: _true(tasks() > tasks0 + 150), 10.0)  # the followers run
        for w in writers:
            reset(w)

        async def given_back() -> bool:
            return tasks() <= tasks0 + 1 and len(os.listdir("/proc/self/fd")) <= fds0

        assert await until(given_back, 10.0), (tasks() - tasks0, len(os.listdir("/proc/self/fd")) - fds0)
        assert s.gateway.hub.count() == 0 and s.gateway.hub.per_sub == {}
        assert await until(_none_left(nats_url, prefix), 15.0)


async def test_a_server_sent_events_reader_that_never_reads_is_cut_off(
    prefix: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five clients ask for the events of a job with 6 MB of history and never read, keeping
    their sockets: within the write stall limit (2 s here) plus a margin, the gateway must drop
    them and give back the streams' tasks and JetStream consumers.

    Failed before (7 of 7 runs: +20 tasks after 8 s, 4 per stream): nothing bounded an HTTP
    response the client does not read (uvicorn's ``send`` waits for a paused transport for
    ever; server.py ``LeanHttp`` timed the reading of requests only): each stream held its
    tasks and an ordered consumer for as long as the client kept its socket (20 such clients:
    +80 tasks and 20 consumers, unchanged after 30 s)."""
    monkeypatch.setattr(LeanHttp, "write_stall_s", 2.0, raising=False)
    async with started(prefix, nats_url) as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        token = make_token("sse")
        h = {"Authorization": f"Bearer {token}"}
        r = await c.post("/v1/jobs", json={"kind": "spew", "input": {"count": 300, "size": 20_000}}, headers=h)
        job_id = r.json()["job_id"]
        assert await until(lambda: _done(c, job_id, h), 20.0)
        tasks0 = tasks()
        loop = asyncio.get_running_loop()
        socks = []
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", int(s.url.rsplit(":", 1)[1])))
            head = f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n"
            await loop.sock_sendall(sock, head.encode())
            socks.append(sock)
        try:
            assert await until(lambda: _true(tasks() >= tasks0 + 5), 10.0)  # the streams run
            assert await until(lambda: _true(tasks() <= tasks0 + 1), 8.0), tasks() - tasks0
            assert await until(_none_left(nats_url, prefix), 15.0)
        finally:
            for sock in socks:
                sock.close()


def tasks() -> int:
    """This process's tasks but the job runner's (the spew and crunch jobs run in this pod too)."""
    return sum(not t.get_coro().__qualname__.startswith(("Jobs.", "QueueMixin.")) for t in asyncio.all_tasks())  # type: ignore[union-attr]


async def _true(value: bool) -> bool:
    return value


async def _done(c: httpx.AsyncClient, job_id: str, h: dict[str, str]) -> bool:
    return bool((await c.get(f"/v1/jobs/{job_id}", headers=h)).json()["status"] != "pending")


def _none_left(nats_url: str, prefix: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await consumers(nats_url, prefix) == 0

    return check


async def test_event_streams_count_as_the_users_long_lived_connections(prefix: str, nats_url: str) -> None:
    """Each Server-Sent Events stream holds a JetStream consumer and four tasks for as long as
    its client stays; nothing bounded them per user (``max_sockets_per_user`` counted WebSockets
    only). Streams and WebSockets now share it: past it, 429 with ``Retry-After``; a stream
    that ends, or whose client leaves, gives its place back."""
    text = gateway_manifest(prefix, gateway="max_sockets_per_user = 2")
    async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s, httpx.AsyncClient(base_url=s.url, timeout=20) as c:
        h = {"Authorization": f"Bearer {make_token('streamer')}"}
        r = await c.post("/v1/jobs", json={"kind": "spew", "input": {"count": 100, "every_s": 0.1}}, headers=h)
        job_id = r.json()["job_id"]
        async with c.stream("GET", f"/v1/jobs/{job_id}/events", headers=h) as first:
            assert first.status_code == 200
            _, writer = await raw_ws_open(s.ws_url, make_token("streamer"))  # the second connection
            try:
                over = await c.get(f"/v1/jobs/{job_id}/events", headers=h)
                assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1, over.text
                assert s.gateway.hub.per_sub == {"streamer": 2}
            finally:
                reset(writer)
        assert await until(lambda: _true(s.gateway.hub.per_sub == {}), 5.0), s.gateway.hub.per_sub
        finished = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 3}}, headers=h)
        done_id = finished.json()["job_id"]
        assert await until(lambda: _done(c, done_id, h), 10.0)
        whole = await c.get(f"/v1/jobs/{done_id}/events", headers=h)  # read to its end
        assert whole.status_code == 200 and "job.done" in whole.text
        assert s.gateway.hub.per_sub == {}


async def test_a_socket_remembers_a_bounded_number_of_jobs_to_cancel(
    prefix: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs submitted with ``cancel_on_disconnect`` were kept in a set until their follower saw
    them end; a job not followed (past ``MAX_FOLLOWED_JOBS``) stayed for the socket's life, so
    the set grew with every submit and closing the socket cancelled each one. It is now bounded,
    oldest out (here 3; past the users' job limits the oldest have finished)."""
    from aiwfe.plugins.gateway import commands

    monkeypatch.setattr(commands, "MAX_CANCEL_ON_DISCONNECT", 3, raising=False)
    async with started(prefix, nats_url) as s:
        _, writer = await raw_ws_open(s.ws_url, make_token("keeper"))
        try:
            for i in range(SLOTS):  # running jobs: each stays remembered until it ends
                job = {"n": i, "delay_s": 20}
                frame = {"type": "submit", "id": str(i), "kind": "crunch", "input": job, "cancel_on_disconnect": True}
                raw_ws_send_text(writer, json.dumps(frame))

            def socket_commands() -> list[Any]:
                return [c.commands for cs in s.gateway.hub.by_jti.values() for c in cs]

            async def all_accepted() -> bool:
                return sum(len(c.followers) for c in socket_commands()) == SLOTS

            assert await until(all_accepted, 10.0)
            assert [len(c.cancel_on_disconnect) for c in socket_commands()] == [3]
        finally:
            reset(writer)


async def test_an_event_stream_dropped_without_being_told_gives_its_place_back() -> None:
    """Litestar stops iterating a stream whose task is cancelled outside the stream's own
    ``__anext__`` (a disconnect while it waits in ``send``) and only drops it. The hub held each
    stream being sent strongly (to end it on a revocation), so such a stream, its user's place
    among ``max_sockets_per_user`` and its job's consumer were kept for good (so was any stream
    until its token's expiry timer fired). Failed before: the user's count stayed at 1."""
    import gc

    from aiwfe.plugins.gateway.hub import Held, Hub

    async def events() -> AsyncIterator[int]:
        for i in range(10):
            yield i
            await asyncio.sleep(3600)

    hub = Hub()
    assert hub.hold("u1", 4)
    stream = Held(hub, "u1", events(), "jti-1", time.time() + 600)
    assert await stream.__anext__() == 0  # being sent: one of the hub's streams
    assert len(hub.streams) == 1 and hub.per_sub == {"u1": 1}
    del stream  # what Litestar does with a stream it stopped sending
    gc.collect()
    assert len(hub.streams) == 0 and hub.per_sub == {}
