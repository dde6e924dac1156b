"""Liveness of calls over a real NATS server (:mod:`aiwfe.bus.nats`, "Liveness of calls").

A pod killed (``kill -9``) while serving a call is noticed in seconds, not at the end of the
caller's 30 s budget: the caller gets ``PeerLost`` (retryable), or, for an ``Idempotent``
contract, the reply of another replica. A callee that is slow but alive runs past the
liveness window, also under the least-privilege NATS users of ``aiwfe up``. Callers that do
not follow heartbeats are not disturbed by them.

The elapsed-time checks are correctness bounds of the design (noticed in about 2 s, asserted
well under the 30 s deadline), not performance figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest

from aiwfe.bus.base import Headers
from aiwfe.bus.codec import ALIVE_TOKEN
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel import Event, Idempotent, Job, PeerLost, Plugin, Reply, Request, current_job, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools import natsauth
from aiwfe.kernel.tools.embedded import EmbeddedNats
from aiwfe.kernel.tools.natsauth import pod_user, user_url
from tests.support.pods import dump_toml, running, start_pod, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

NAP = "tests.integration.test_liveness:NapPlugin"
CALLER = "tests.integration.test_liveness:CallerPlugin"
HANG_ENV = "AIWFE_TEST_NAP_HANGS"  # set in a pod whose handlers never answer (it is killed)


class Napped(Reply):
    pid: int
    calls: int


class Nap(Request[Napped], Idempotent, tag="live.nap"):
    """Sleep ``seconds`` (forever in a pod with AIWFE_TEST_NAP_HANGS); ``mark``: a file created on arrival."""

    seconds: float = 0.0
    mark: str = ""


class Hang(Request[Napped], tag="live.hang"):
    """The same, not idempotent."""

    seconds: float = 0.0
    mark: str = ""


class Chore(Job[Napped], tag="live.chore"):
    """A job that reports a step and then finishes (never, in a pod with AIWFE_TEST_NAP_HANGS)."""


class Stepped(Event, tag="live.stepped"):
    pid: int


class NapPlugin(Plugin):
    name = "nap"
    calls_seen = 0

    @serves(Chore, ack_wait_s=2.0, max_deliver=3)
    async def chore(self, job: Chore) -> Napped:
        ctx = current_job()
        assert ctx is not None
        await ctx.emit(Stepped(pid=os.getpid()))
        await asyncio.sleep(3600 if os.environ.get(HANG_ENV) else 0)
        return Napped(pid=os.getpid(), calls=ctx.attempt)

    async def _nap(self, seconds: float, mark: str) -> Napped:
        NapPlugin.calls_seen += 1
        if mark:
            await asyncio.to_thread(Path(mark).touch)
        await asyncio.sleep(3600 if os.environ.get(HANG_ENV) else seconds)
        return Napped(pid=os.getpid(), calls=NapPlugin.calls_seen)

    @serves(Nap, timeout_s=120)
    async def nap(self, req: Nap) -> Napped:
        return await self._nap(req.seconds, req.mark)

    @serves(Hang, timeout_s=120)
    async def hang(self, req: Hang) -> Napped:
        return await self._nap(req.seconds, req.mark)


class CallerPlugin(Plugin):
    name = "napper"
    calls = (Nap, Hang)


def _manifest(prefix: str, pods: dict[str, list[str]]) -> str:
    return dump_toml(
        {"system": {"subject_prefix": prefix, "drain_timeout_s": 1}, "pods": {n: {"plugins": p} for n, p in pods.items()}}
    )


@contextlib.asynccontextmanager
async def _kernel(nats_url: str, prefix: str) -> AsyncIterator[Kernel]:
    bus = NatsBus(nats_url, prefix, name="caller")
    await bus.start()
    try:
        yield Kernel(bus)
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def _hanging_pod(tmp_path: Path, nats_url: str, prefix: str) -> AsyncIterator[int]:
    """A pod process (``aiwfe run``) serving Nap and Hang that never answers; yields its pid."""
    manifest = tmp_path / "nap.toml"
    manifest.write_text(_manifest(prefix, {"nap": [NAP]}))
    pp = start_pod(manifest, "nap", {"NATS_URL": nats_url, HANG_ENV: "1"}, tmp_path)
    try:
        await asyncio.to_thread(wait_ready, [pp], 60)
        yield pp.proc.pid
    finally:
        if pp.proc.poll() is None:
            pp.proc.kill()
        pp.proc.wait(10)


async def _arrived(mark: Path) -> None:
    for _ in range(1000):
        if await asyncio.to_thread(mark.exists):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the call never reached the pod")


async def test_a_callee_killed_mid_call_is_noticed_long_before_the_deadline(nats_url: str, prefix: str, tmp_path: Path) -> None:
    async with _kernel(nats_url, prefix) as k, _hanging_pod(tmp_path, nats_url, prefix) as pid:
        mark = tmp_path / "arrived"
        call = asyncio.create_task(k.call(Hang(seconds=60, mark=str(mark)), timeout_s=30))
        await _arrived(mark)
        await asyncio.sleep(1.2)  # heartbeats have started
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="not called again") as e:
            await call
        assert e.value.retryable
        assert time.monotonic() - t0 < 10  # noticed in about 2 s, not after the 30 s budget


async def test_an_idempotent_call_is_answered_by_another_replica(nats_url: str, prefix: str, tmp_path: Path) -> None:
    async with _kernel(nats_url, prefix) as k, _hanging_pod(tmp_path, nats_url, prefix) as pid:
        mark = tmp_path / "arrived"
        call = asyncio.create_task(k.call(Nap(seconds=0, mark=str(mark)), timeout_s=30))
        await _arrived(mark)  # the doomed replica has it; now a second one starts, then the first dies
        async with running(parse_manifest(_manifest(prefix, {"nap2": [NAP]}), env={}), nats_url=nats_url):
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            r = await call
            assert r.pid == os.getpid()
            assert time.monotonic() - t0 < 10


async def test_a_job_whose_worker_was_killed_says_so_before_repeating_its_progress(
    nats_url: str, prefix: str, tmp_path: Path
) -> None:
    async with _kernel(nats_url, prefix) as k, _hanging_pod(tmp_path, nats_url, prefix) as pid:
        job_id = await k.submit(Chore())
        events = k.jobs.events(job_id)
        first = await anext(events)
        assert (first.type, first.data["pid"]) == ("live.stepped", pid)
        async with running(parse_manifest(_manifest(prefix, {"nap2": [NAP]}), env={}), nats_url=nats_url):
            os.kill(pid, signal.SIGKILL)  # the job is redelivered after its ack wait, to nap2
            rest = [(ev.type, ev.data) async for ev in events]
    assert [t for t, _ in rest] == ["job.retrying", "live.stepped", "job.done"]
    assert (rest[0][1]["attempt"], rest[0][1]["type"]) == (1, "WorkerLost")
    assert rest[1][1]["pid"] == os.getpid()


async def test_a_slow_callee_that_is_alive_runs_past_the_liveness_window(nats_url: str, prefix: str) -> None:
    m = parse_manifest(_manifest(prefix, {"nap": [NAP]}), env={})
    async with _kernel(nats_url, prefix) as k, running(m, nats_url=nats_url):
        before = NapPlugin.calls_seen
        r = await k.call(Hang(seconds=5), timeout_s=30)
        assert (r.pid, NapPlugin.calls_seen - before) == (os.getpid(), 1)  # answered, called once


async def test_no_responders_waits_for_a_subscription_that_comes(nats_url: str, prefix: str) -> None:
    """The CI flake of test_call_crosses_pods_and_returns_typed_reply: a call right after pods
    started found no responder yet. It is sent again until one serves (within 2 s)."""
    async with _kernel(nats_url, prefix) as k:
        late = NatsBus(nats_url, prefix, name="late")
        await late.start()
        try:

            async def handler(data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
                return msgspec.msgpack.encode(Napped(pid=1, calls=1)), None

            async def serve_later() -> None:
                await asyncio.sleep(0.4)
                await late.serve(f"{prefix}.live.hang", handler)

            task = asyncio.create_task(serve_later())
            assert (await k.call(Hang(), timeout_s=10)).pid == 1  # any contract: nothing was delivered
            await task
        finally:
            await late.close()


async def test_callers_that_do_not_follow_heartbeats_get_their_reply(nats_url: str, prefix: str) -> None:
    """nats-py's own request and an unmarked FastClient call ignore a heartbeat on their mux
    while a followed call on the same connection is kept alive by them."""
    m = parse_manifest(_manifest(prefix, {"nap": [NAP]}), env={})
    async with _kernel(nats_url, prefix) as k, running(m, nats_url=nats_url):
        raw = await nats.connect(nats_url)
        try:
            body = json.dumps({"seconds": 2.5}).encode()
            hdr = {"Content-Type": "application/json"}
            plain = asyncio.create_task(raw.request(f"{prefix}.live.hang", body, timeout=20, headers=hdr))
            followed = asyncio.create_task(k.call(Hang(seconds=2.5), timeout_s=20))
            await asyncio.sleep(0.3)
            await raw.publish(f"{raw._resp_sub_prefix.decode()}{ALIVE_TOKEN}", b"anything at all")  # type: ignore[union-attr]
            assert json.loads((await plain).data)["calls"] >= 1
            assert (await followed).pid == os.getpid()
        finally:
            await raw.close()


async def test_heartbeats_pass_the_least_privilege_permissions(prefix: str, tmp_path: Path) -> None:
    """Pods publish heartbeats with their own NATS users (aiwfe.kernel.tools.natsauth): a call
    longer than the liveness window succeeds and the server logs no violation by a pod."""
    manifest = parse_manifest(_manifest(prefix, {"caller": [CALLER], "nap": [NAP]}), env={})
    perms = natsauth.permissions(manifest)
    passwords = natsauth.load_passwords(tmp_path / "nats-passwords.json", list(perms))
    server = EmbeddedNats(tmp_path / "nats", config=natsauth.render_config(perms, passwords)).start()
    try:
        urls = {n: user_url(server.url, pod_user(n), passwords[pod_user(n)]) for n in manifest.pods}
        pods = {n: PodRunner(manifest, n, NatsBus(urls[n], prefix, name=n), ops_port=0) for n in manifest.pods}
        async with contextlib.AsyncExitStack() as stack:
            for p in pods.values():
                await stack.enter_async_context(p)
            r = await pods["caller"].kernel.call(Hang(seconds=3.5), timeout_s=30)
            assert r.calls >= 1
        violations = [line for line in server.log_path.read_text().splitlines() if "Violation" in line]
        assert not [v for v in violations if "user:pod-" in v], "\n".join(violations)
    finally:
        server.stop()
