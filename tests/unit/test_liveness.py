"""Liveness of calls, the kernel's half, on LocalBus: no-responders is sent again within its
window, an Idempotent contract is called again once after its callee was lost and any other
fails fast with PeerLost, helios retries a job only for infrastructure failures, and a
redelivered job says so before running again.

The bus's half (heartbeats, a callee killed mid-call) needs a real server:
tests/integration/test_liveness.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from aiwfe.bus.base import Headers
from aiwfe.bus.errors import CalleeLost
from aiwfe.bus.local import LocalBus
from aiwfe.kernel import (
    DeadlineExceeded,
    Idempotent,
    Overloaded,
    PeerLost,
    Plugin,
    RemoteError,
    Reply,
    Request,
    Unavailable,
    serves,
)
from aiwfe.kernel.errors import from_wire, to_wire
from aiwfe.kernel.jobs import JobCall, Jobs
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.plugin import HandlerOptions
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import NO_RESPONDERS_WAIT_S, Kernel
from aiwfe.plugins.helios.contract import Ask
from aiwfe.plugins.helios.plugin import _infrastructure
from aiwfe.plugins.learning.contract import ExpertScores, Feedback
from aiwfe.plugins.memory.contract import Forget, Recall, Remember
from aiwfe.plugins.perception.contract import Perceive
from aiwfe.plugins.reasoning.contract import Reason, Reasoned


class Done(Reply):
    n: int = 0


class Read(Request[Done], Idempotent, tag="live.read"):
    pass


class Write(Request[Done], tag="live.write"):
    pass


_enc = msgspec.msgpack.Encoder()


class LosingBus(LocalBus):
    """A LocalBus whose first ``lose`` requests reach a callee that then goes silent."""

    def __init__(self, prefix: str, lose: int) -> None:
        super().__init__(prefix)
        self.lose = lose
        self.requests = 0

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        self.requests += 1
        if self.lose > 0:
            self.lose -= 1
            raise CalleeLost(f"{subject}: the pod serving the call went silent")
        return await super().request(subject, data, headers, timeout_s)


async def _serve(bus: LocalBus, subject: str, calls: list[int]) -> None:
    async def handler(data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        calls.append(1)
        return _enc.encode(Done(n=len(calls))), None

    await bus.serve(subject, handler)


def test_the_plugins_declare_what_is_idempotent() -> None:
    assert all(issubclass(c, Idempotent) for c in (Perceive, Recall, ExpertScores, Reason))
    assert not any(issubclass(c, Idempotent) for c in (Remember, Forget, Feedback))


def test_peer_lost_is_a_retryable_unavailable_on_the_wire() -> None:
    e = from_wire(to_wire(PeerLost("x.y: the pod serving the call went silent")))
    assert type(e) is PeerLost and isinstance(e, Unavailable) and e.retryable and e.code == "peer_lost"


@pytest.mark.parametrize("lose", [1, 2])
async def test_an_idempotent_call_is_called_again_once(prefix: str, lose: int) -> None:
    bus = LosingBus(prefix, lose)
    calls: list[int] = []
    await _serve(bus, f"{prefix}.live.read", calls)
    k = Kernel(bus)
    if lose == 1:
        assert (await k.call(Read(), timeout_s=5)).n == 1
    else:
        with pytest.raises(PeerLost, match="after calling again once"):
            await k.call(Read(), timeout_s=5)
    assert bus.requests == 2


async def test_any_other_call_fails_fast_with_peer_lost(prefix: str) -> None:
    bus = LosingBus(prefix, 1)
    calls: list[int] = []
    await _serve(bus, f"{prefix}.live.write", calls)
    with pytest.raises(PeerLost, match="not called again") as e:
        await Kernel(bus).call(Write(), timeout_s=5)
    assert e.value.retryable and (bus.requests, calls) == (1, [])


async def test_no_responders_is_sent_again_until_a_pod_serves(prefix: str) -> None:
    bus = LocalBus(prefix)
    calls: list[int] = []

    async def later() -> None:
        await asyncio.sleep(0.3)
        await _serve(bus, f"{prefix}.live.write", calls)

    task = asyncio.create_task(later())
    assert (await Kernel(bus).call(Write(), timeout_s=5)).n == 1  # safe for any contract: nothing was delivered
    await task


async def test_no_responders_waits_at_most_its_window(prefix: str) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(Unavailable, match=f"no pod serves {prefix}.live.write") as e:
        await Kernel(LocalBus(prefix)).call(Write(), timeout_s=30)
    assert type(e.value) is Unavailable and e.value.retryable
    # a bound of the design (2 s window), not a performance figure: far from the 30 s deadline
    assert loop.time() - t0 < NO_RESPONDERS_WAIT_S + 3


async def test_an_optional_call_does_not_wait_for_a_pod(prefix: str) -> None:
    bus, calls = LocalBus(prefix), list[int]()

    async def later() -> None:
        await asyncio.sleep(0.3)
        await _serve(bus, f"{prefix}.live.write", calls)

    task = asyncio.create_task(later())
    with pytest.raises(Unavailable, match=f"no pod serves {prefix}.live.write"):
        await Kernel(bus).call(Write(), timeout_s=5, optional=True)  # not sent again: nobody got it
    await task
    assert calls == []  # ... so the pod that came later never ran it
    assert (await Kernel(bus).call(Write(), timeout_s=5, optional=True)).n == 1  # served now: answered


def test_helios_tells_infrastructure_failures_from_content_ones() -> None:
    assert _infrastructure(PeerLost("lost")) and _infrastructure(Unavailable("down")) and _infrastructure(Overloaded("full"))
    assert _infrastructure(RemoteError("ConnectError", "llm unreachable", retryable=True))
    assert not _infrastructure(DeadlineExceeded("slow"))  # as slow again next time
    assert not _infrastructure(RemoteError("ValueError", "bad prompt"))


async def _events(bus: LocalBus, prefix: str, job_id: str) -> list[tuple[str, Any]]:
    return [(m.headers["Aiwfe-Type"], msgspec.msgpack.decode(m.data)) for m in await bus.read(f"{prefix}.events.{job_id}")]


async def test_a_redelivered_job_says_so_before_repeating_its_progress(prefix: str) -> None:
    """Attempt 2 without a nak from the kernel (its worker died): job.retrying (WorkerLost)
    comes before the progress the handler repeats."""
    bus = LocalBus(prefix)
    jobs = Jobs(bus)

    async def runner(call: JobCall) -> bytes:
        await jobs.emit(call.job_id, "probe.progressed", _enc.encode({"attempt": call.attempt}))
        return _enc.encode({"ok": True})

    call = JobCall(job_id="j1", kind="probe.crunch", data=b"", headers={}, attempt=2, max_deliver=3, seq=7)
    assert await jobs.process(call, HandlerOptions(max_deliver=3), runner) == ("ack", 0.0)
    events = await _events(bus, prefix, "j1")
    assert [t for t, _ in events] == ["job.retrying", "probe.progressed", "job.done"]
    assert events[0][1]["attempt"] == 1 and events[0][1]["type"] == "WorkerLost" and events[0][1]["retryable"]


async def test_a_job_the_kernel_naked_says_so_once(prefix: str) -> None:
    bus = LocalBus(prefix)
    jobs = Jobs(bus)

    async def runner(call: JobCall) -> bytes:
        await jobs.emit(call.job_id, "probe.progressed", _enc.encode({"attempt": call.attempt}))
        if call.attempt == 1:
            raise Unavailable("reasoning is restarting")
        return _enc.encode({"ok": True})

    opts = HandlerOptions(max_deliver=3, backoff_s=(0.0,))
    for attempt in (1, 2):
        call = JobCall(job_id="j2", kind="probe.crunch", data=b"", headers={}, attempt=attempt, max_deliver=3, seq=9)
        await jobs.process(call, opts, runner)
    events = await _events(bus, prefix, "j2")
    assert [t for t, _ in events] == ["probe.progressed", "job.retrying", "probe.progressed", "job.done"]
    assert events[1][1]["type"] == "Unavailable"  # the kernel's own reason, not repeated as WorkerLost


class FlakyReasoning(Plugin):
    """Serves reasoning.reason by raising ``error`` (None: answering) -- a stand-in for a
    reasoning pod that is unreachable (infrastructure) or refuses the prompt (content)."""

    name = "flaky_reasoning"
    error: Exception | None = None

    @serves(Reason)
    async def reason(self, req: Reason) -> Reasoned:
        if FlakyReasoning.error is not None:
            raise FlakyReasoning.error
        return Reasoned(answer=f"{req.role} says yes.", confidence=0.8, provider="flaky")


HELIOS = """
[system]
subject_prefix = "{prefix}"
[pods.all]
plugins = ["helios", "perception", "tests.unit.test_liveness:FlakyReasoning"]
[plugins.helios]
cache_prefix = "{prefix}:"
"""


@pytest.mark.parametrize("infrastructure", [True, False])
async def test_helios_retries_a_job_only_for_infrastructure_failures(prefix: str, infrastructure: bool) -> None:
    FlakyReasoning.error = Overloaded("reasoning is full") if infrastructure else ValueError("prompt refused")
    m = parse_manifest(HELIOS.format(prefix=prefix), env={})
    try:
        async with PodRunner(m, "all", LocalBus(prefix), ops_port=0) as pod:
            k = pod.kernel
            job_id = await k.submit(Ask(text="Design the database", max_experts=2, use_cache=False))
            types: list[str] = []
            async for ev in k.job_events(job_id):
                types.append(ev.type)
                if ev.type == "job.retrying":
                    assert ev.data["type"] == "ExpertsUnavailable" and ev.data["retryable"]
                    FlakyReasoning.error = None  # the pod is back: the next attempt gets answers
            rec = await k.wait_job(job_id, timeout_s=20)
    finally:
        FlakyReasoning.error = None
    if infrastructure:
        assert rec.status == "done" and rec.attempts == 2
        assert types.index("job.retrying") < types.index("helios.expert_answered")
    else:
        assert rec.status == "failed" and rec.error is not None and rec.error["type"] == "NoAnswers"
        assert "job.retrying" not in types
