"""Job semantics on LocalBus (aiwfe.kernel.jobs): retries, dead letters, records written once,
events and resume, cancel, JSON jobs, replay. tests/integration/test_nats_bus.py runs these
same bodies over a real NATS server."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from aiwfe.kernel import admin
from aiwfe.kernel.errors import BadInput
from tests.support.pods import StartPods
from tests.support.probe import Crunch
from tests.unit.test_routing import PROBE, TWO_PODS


async def test_jobs_retry_then_succeed_and_stream_events(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=6, fail_times=1))
        rec = await k.wait_job(job_id, timeout_s=20)
        assert rec.status == "done" and rec.attempts == 2
        assert msgspec.msgpack.decode(rec.result) == {"n": 6, "square": 36, "answer": "The square of 6 is 36."}
        types = [ev.type async for ev in k.job_events(job_id)]
        assert types == ["job.retrying", "probe.progressed", "job.done"]


async def test_poison_job_is_dead_lettered_with_reason(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=1, fail_times=99))
        rec = await k.wait_job(job_id, timeout_s=20)
        assert rec.status == "failed" and rec.attempts == 3
        assert rec.error is not None and rec.error["type"] == "Flaky"
        letters = await admin.dead_letters(k.jobs, "probe.crunch")
        assert len(letters) == 1
        data, headers = letters[0]
        assert headers["Aiwfe-Job-Id"] == job_id
        assert msgspec.json.decode(headers["Aiwfe-Reason"])["message"].startswith("attempt 3")
        assert msgspec.msgpack.decode(data)["n"] == 1


async def test_idempotency_key_gives_one_job(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        a = await k.submit(Crunch(n=2), idempotency_key="order-17")
        b = await k.submit(Crunch(n=2), idempotency_key="order-17")
        assert a == b
        rec = await k.wait_job(a, timeout_s=20)
        assert rec.status == "done" and rec.attempts == 1
        c = await k.submit(Crunch(n=2), idempotency_key="order-17")  # after completion too
        assert c == a
        await asyncio.sleep(0.3)  # a quiet period: a duplicate run would show up in it
        done = [ev.type async for ev in k.job_events(a)]
        assert done.count("job.done") == 1 and done.count("probe.progressed") == 1


async def test_job_events_resume_after_a_sequence(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=3, fail_times=1))
        await k.wait_job(job_id, timeout_s=20)
        events = [ev async for ev in k.job_events(job_id)]
        resumed = [ev async for ev in k.job_events(job_id, after_seq=events[0].seq)]
        assert [e.seq for e in resumed] == [e.seq for e in events[1:]]


async def test_many_jobs_each_recorded_once(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        ids = [await k.submit(Crunch(n=i)) for i in range(200)]
        recs = await asyncio.gather(*(k.wait_job(j, timeout_s=30) for j in ids))
        assert [msgspec.msgpack.decode(r.result)["square"] for r in recs] == [i * i for i in range(200)]


async def test_cancel_a_running_job(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=8, delay_s=30))
        events = k.job_events(job_id)
        assert (await anext(events)).type == "probe.progressed"  # it is running
        assert await k.cancel_job(job_id, "user pressed stop")
        last = await anext(events)
        assert last.type == "job.cancelled" and last.data["message"] == "user pressed stop"
        rec = await k.wait_job(job_id, timeout_s=5)
        assert rec.status == "cancelled"
        assert not await k.cancel_job(job_id)  # already has an outcome
        await asyncio.sleep(0.3)  # a quiet period: a late outcome would show up in it
        assert (await k.job_record(job_id)).status == "cancelled"  # type: ignore[union-attr]


async def test_cancel_before_start_and_after_done(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        done = await k.submit(Crunch(n=2))
        assert (await k.wait_job(done, timeout_s=10)).status == "done"
        assert not await k.cancel_job(done)
        assert (await k.job_record(done)).status == "done"  # type: ignore[union-attr]


async def test_submit_json_job_bad_json_refused_and_bad_payload_dead_lettered(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        ok = await k.submit_json("probe.crunch", b'{"n": 12}')
        rec = await k.wait_job(ok, timeout_s=10)
        assert rec.status == "done" and msgspec.msgpack.decode(rec.result)["square"] == 144
        with pytest.raises(BadInput, match=r"\$\.n"):  # validated by the consumer's pod before queueing
            await k.submit_json("probe.crunch", b'{"n": "twelve"}')
        for kernel in (k, pods["front"].kernel):  # validated by the other pod, then in-process
            for n in (2**64, -(2**63) - 1):  # JSON has no bound, the bus's msgpack 64 bits
                with pytest.raises(BadInput, match=r"input\.n: integers must be from -2\^63 to 2\^64-1"):
                    await kernel.submit_json("probe.crunch", b'{"n": %d}' % n)
        top = await k.submit_json("probe.crunch", b'{"n": %d}' % (2**31))  # its square still fits
        assert (await k.wait_job(top, timeout_s=10)).status == "done"
        bad = "bad-payload-job"  # a payload that got past validation is dead-lettered by the consumer
        await k.jobs.submit("probe.crunch", b'{"n": "twelve"}', {"Nats-Msg-Id": bad, "Content-Type": "application/json"}, bad)
        rec = await k.wait_job(bad, timeout_s=10)
        assert rec.status == "failed" and rec.attempts == 1 and rec.error is not None
        assert rec.error["type"] == "BadMessage"


async def test_dead_letters_replay_under_the_same_job_id(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        job_id = await k.submit(Crunch(n=-4))  # poison: fails every attempt
        rec = await k.wait_job(job_id, timeout_s=20)
        assert rec.status == "failed" and rec.attempts == 3
        pods["front"].plugins[PROBE].reject_negative = False  # the handler is fixed
        assert await admin.replay_dead_letters(k.jobs, "probe.crunch") == [job_id]
        assert await admin.dead_letters(k.jobs) == []
        rec = await k.wait_job(job_id, timeout_s=20)
        assert rec.status == "done" and msgspec.msgpack.decode(rec.result)["square"] == 16
        first = [ev async for ev in k.job_events(job_id)]  # stops at the first outcome
        assert first[-1].type == "job.failed"
        after = [ev.type async for ev in k.job_events(job_id, after_seq=first[-1].seq)]
        assert after == ["job.replayed", "probe.progressed", "job.done"]


async def test_a_first_delivery_of_a_cancelled_job(prefix: str) -> None:
    """A first delivery reads no record (aiwfe.kernel.jobs.Jobs.process): a pod that heard
    the cancel broadcast skips the job; one that was away runs it, and the job still keeps
    its one "cancelled" outcome and announces nothing else."""
    from aiwfe.bus.local import LocalBus
    from aiwfe.kernel.jobs import JobCall, Jobs
    from aiwfe.kernel.plugin import HandlerOptions

    bus = LocalBus(prefix)
    await bus.start()
    try:
        canceller = Jobs(bus)
        ran: list[str] = []

        async def runner(call: JobCall) -> bytes:
            ran.append(call.job_id)
            return msgspec.msgpack.encode({"square": 4})

        def call(job_id: str) -> JobCall:
            return JobCall(job_id=job_id, kind="probe.crunch", data=b"", headers={}, attempt=1, max_deliver=3)

        assert await canceller.cancel("away")  # no pod listening yet
        worker = Jobs(bus)
        await worker.start()
        assert await canceller.cancel("heard")
        for _ in range(100):  # the broadcast is delivered by the bus's own task
            if "heard" in worker._recent_cancels:
                break
            await asyncio.sleep(0.01)
        assert await worker.process(call("heard"), HandlerOptions(), runner) == ("ack", 0.0)
        assert ran == []  # heard: never ran
        assert await worker.process(call("away"), HandlerOptions(), runner) == ("ack", 0.0)
        assert ran == ["away"]  # away: ran, but its outcome stands
        for job_id in ("away", "heard"):
            assert (await worker.record(job_id)).status == "cancelled"  # type: ignore[union-attr]
            kinds = [m.headers.get("Aiwfe-Type") for m in await bus.read(f"{prefix}.events.{job_id}")]
            assert kinds == ["job.cancelled"]
        worker.stop()
    finally:
        await bus.close()


async def test_a_handler_that_swallows_its_cancellation_leaves_nothing_behind(prefix: str) -> None:
    """A job cancelled while it runs is marked so that its CancelledError reads as the client's
    cancel, not a stopping pod. A handler that caught the cancellation and returned left its
    mark for good: one job id more in memory per such cancel, for the life of the pod."""
    from aiwfe.bus.local import LocalBus
    from aiwfe.kernel.jobs import JobCall, Jobs
    from aiwfe.kernel.plugin import HandlerOptions

    bus = LocalBus(prefix)
    await bus.start()
    worker = Jobs(bus)
    try:
        started = asyncio.Event()

        async def stubborn(call: JobCall) -> bytes:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pass  # swallowed: the handler's choice
            return msgspec.msgpack.encode({"square": 4})

        call = JobCall(job_id="stubborn", kind="probe.crunch", data=b"", headers={}, attempt=1, max_deliver=3)
        run = asyncio.get_running_loop().create_task(worker.process(call, HandlerOptions(), stubborn))
        await started.wait()
        worker._stop_running("stubborn")  # what the cancel broadcast does in the running pod
        assert await run == ("ack", 0.0)
        assert worker._cancelled == set()
    finally:
        worker.stop()
        await bus.close()


async def test_events_sent_together_are_each_stored_in_order(start_pods: StartPods) -> None:
    from aiwfe.kernel.jobs import JobContext
    from tests.support.probe import Progressed

    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel
        ctx = JobContext(k.jobs, "together1")
        first = await ctx.emit(Progressed(n=0, step="s"))
        seqs = await ctx.emit_many([Progressed(n=i, step="s") for i in range(1, 6)])
        assert seqs == sorted(seqs) and len(set(seqs)) == 5 and seqs[0] > first
        assert await ctx.emit_many([]) == []
        stored = [m async for m in _first(k.jobs.events("together1"), 6)]
        assert [ev.data["n"] for ev in stored] == list(range(6))
        assert [ev.seq for ev in stored] == [first, *seqs] and {ev.type for ev in stored} == {"probe.progressed"}


async def _first(events, n):  # type: ignore[no-untyped-def]
    async for ev in events:
        yield ev
        n -= 1
        if n == 0:
            return


async def test_the_in_process_queue_retires_a_kind_only_when_empty() -> None:
    """LocalBus.retire_kind, as the NATS one (tests/integration/test_submitting.py): refused while
    a job of the kind is queued; afterwards a submit of it is refused like any unknown kind."""
    from aiwfe.bus.errors import NotAccepted
    from aiwfe.bus.local import LocalBus

    bus = LocalBus("retire")
    await bus.accept_kinds(["a.run", "b.run"])
    assert await bus.enqueue("b.run", b"x", {}, "m1")
    with pytest.raises(NotAccepted, match="still queued"):
        await bus.retire_kind("b.run")
    await bus.retire_kind("a.run")
    assert await bus.job_kinds() == ["b.run"]
    with pytest.raises(NotAccepted, match="no stream takes this kind"):
        await bus.enqueue("a.run", b"x", {}, "m2")
