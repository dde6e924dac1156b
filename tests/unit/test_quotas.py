"""Caps and per-owner job slots (aiwfe.kernel.quotas) on LocalBus's key-value bucket: several
JobQuotas on one bucket stand for several gateway pods."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import msgspec
import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel.errors import BadInput, ConfigError
from aiwfe.kernel.quotas import DEFAULT_PER_OWNER, JobLimits, JobQuotas, TooManyJobs, caps_of, check_caps


class Work(msgspec.Struct, frozen=True):
    n: int = 1
    deadline_s: float = 10.0
    parts: int = 1
    latency_s: float | None = None
    input_caps: ClassVar[dict[str, float | str]] = {"n": 5, "parts": "n", "latency_s": 0.0}


def quotas(bus: LocalBus, finished: set[str], **limits: object) -> JobQuotas:
    async def is_finished(job_id: str) -> bool:
        return job_id in finished

    return JobQuotas(bus, is_finished, {"work": JobLimits(**limits)})  # type: ignore[arg-type]


def test_caps_name_field_value_and_cap_and_the_manifest_overrides_them() -> None:
    caps = caps_of(Work, JobLimits(caps={"latency_s": 2.0}))
    check_caps("work", Work(n=5, parts=5, latency_s=2.0), caps)
    check_caps("work", Work(latency_s=None), caps)  # unset values are not checked
    with pytest.raises(BadInput) as e:
        check_caps("work", Work(n=6, parts=7, latency_s=3), caps)
    assert "n = 6 is over its cap (5)" in e.value.message
    assert "parts = 7 is over its cap (n = 6)" in e.value.message
    assert "latency_s = 3 is over its cap (2)" in e.value.message
    with pytest.raises(ConfigError, match="caps name no field of Work: nn"):
        caps_of(Work, JobLimits(caps={"nn": 1}))


def test_the_lease_is_a_backstop_never_shorter_than_lease_s() -> None:
    # a slot is freed by its job's outcome; the lease only frees one whose job never got one,
    # so a job waiting in a backlogged queue keeps its slot however short its deadline
    q = quotas(LocalBus("q"), set(), lease_s=300, lease_grace_s=30)
    assert q.hold_s("work", job=Work(deadline_s=10)) == 330
    assert q.hold_s("work", job=Work(deadline_s=1000)) == 1030  # a longer deadline: the deadline
    assert q.hold_s("work", data=b'{"deadline_s": 2000}') == 2030
    assert q.hold_s("work", data=b'{"deadline_s": "x"}') == 330  # not a number: the default lease
    assert q.hold_s("work", data=b"{}") == 330
    assert q.hold_s("other", data=b"{}") == 1800 + 60  # a kind not named: the defaults


def test_a_non_finite_value_is_over_every_cap() -> None:
    caps = caps_of(Work, JobLimits(caps={"latency_s": 2}))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(BadInput, match=r"latency_s = (nan|inf) is over its cap"):
            check_caps("work", Work(latency_s=bad), caps)


async def test_slots_are_shared_by_pods_and_freed_by_outcome_or_expiry() -> None:
    bus, finished = LocalBus("q"), set[str]()
    pods = [quotas(bus, finished, max_per_owner=3) for _ in range(2)]
    for i in range(3):
        assert await pods[i % 2].acquire("work", "alice", f"a{i}", 60) is not None
    with pytest.raises(TooManyJobs) as e:
        await pods[1].acquire("work", "alice", "a3", 60)
    assert e.value.retryable and e.value.retry_after_s == 1.0
    await pods[1].acquire("work", "bob", "b0", 60)  # another user has slots of their own
    finished.add("a1")  # an outcome frees its slot for the next submission (another pod's)
    await pods[0].acquire("work", "alice", "a3", 60)
    short = quotas(bus, finished, max_per_owner=1)
    await short.acquire("work", "carol", "c0", 0.05)
    await asyncio.sleep(0.1)  # a lease leaked by a crash expires
    await short.acquire("work", "carol", "c1", 60)


async def test_a_full_owner_is_refused_at_once_and_the_limits_resolve_in_order() -> None:
    bus = LocalBus("q")
    q = quotas(bus, set())
    assert await q.acquire("work", "u", "x0", 60, declared=1) is not None
    with pytest.raises(TooManyJobs):
        await q.acquire("work", "u", "x1", 60, declared=1)  # the contract's own limit
    assert await q.acquire("work", "~submit", "s0", 60, submitted=True) is not None  # the shared pool: 64
    assert await quotas(bus, set(), max_per_owner=0).acquire("work", "u", "x2", 60) is None  # 0: no limit
    free = quotas(bus, set())
    for i in range(DEFAULT_PER_OWNER):
        await free.acquire("work", "v", f"v{i}", 60)
    with pytest.raises(TooManyJobs):
        await free.acquire("work", "v", "v-last", 60)


async def test_concurrent_reclaims_never_admit_more_than_the_limit() -> None:
    bus, finished = LocalBus("q"), set[str]()
    pods = [quotas(bus, finished, max_per_owner=4) for _ in range(5)]
    for i in range(4):
        await pods[0].acquire("work", "u", f"old{i}", 60)
    finished.update(f"old{i}" for i in range(4))  # every slot is stale now

    async def submit(i: int) -> bool:
        try:
            await pods[i % 5].acquire("work", "u", f"new{i}", 60)
        except TooManyJobs:
            return False
        return True

    assert sum(await asyncio.gather(*(submit(i) for i in range(30)))) == 4


async def test_reasoning_refuses_a_simulated_latency_over_its_cap() -> None:
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner
    from aiwfe.plugins.reasoning.contract import Reason

    text = '[system]\nsubject_prefix = "rq"\n[pods.p]\nplugins = ["reasoning"]\n[plugins.reasoning]\nmax_latency_s = 0.5\n'
    async with PodRunner(parse_manifest(text, env={}), "p", LocalBus("rq"), ops_port=0) as pod:
        assert (await pod.kernel.call(Reason(role="r", task="t", latency_s=0.01))).answer is not None
        with pytest.raises(BadInput, match=r"latency_s = 30 is over its cap \(0.5, max_latency_s\)"):
            await pod.kernel.call(Reason(role="r", task="t", latency_s=30))
