"""Call and event semantics on LocalBus (jobs: test_jobs.py).

tests/integration/test_nats_bus.py runs these same test bodies over a real NATS server
(it overrides the ``start_pods`` fixture), which is how "the same semantics on either
path" is checked.
"""

from __future__ import annotations

import asyncio

import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import (
    DeadlineExceeded,
    Overloaded,
    RemoteError,
    Reply,
    Request,
    SchemaMismatch,
    Unavailable,
    UndeclaredCall,
)
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.pods import StartPods
from tests.support.probe import Ask, Boom, Sleep, WhoAmI

PROBE = "tests.support.probe:ProbePlugin"
WHO = "tests.support.probe:WhoPlugin"

TWO_PODS = f"""
[system]
subject_prefix = "{{prefix}}"
drain_timeout_s = 2
[pods.front]
plugins = ["{PROBE}"]
[pods.back]
plugins = ["perception", "reasoning", "{WHO}"]
"""


class Nobody(Reply):
    pass


class Unserved(Request[Nobody], tag="nobody.home"):
    pass


async def test_call_crosses_pods_and_returns_typed_reply(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        a = await pods["front"].kernel.call(
            Ask(text="How fast is the Postgres database index?", context=["An index makes a database query fast. Rain is wet."])
        )
        assert a.intent == "question"
        assert a.tags[:2] == ["database", "performance"]
        assert a.answer == "An index makes a database query fast."


async def test_handler_exception_becomes_typed_remote_error(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods["back"].kernel  # probe is in the front pod: a remote call
        with pytest.raises(RemoteError) as e:
            await k.call(Boom(message="kaput"))
        assert (e.value.type, e.value.message, e.value.retryable) == ("ValueError", "kaput", False)
        with pytest.raises(RemoteError) as e:
            await k.call(Boom(message="later", retryable=True))
        assert e.value.type == "Flaky" and e.value.retryable
        # the same from inside the pod (local path)
        with pytest.raises(RemoteError) as e:
            await pods["front"].kernel.call(Boom(message="kaput"))
        assert (e.value.type, e.value.message) == ("ValueError", "kaput")


@pytest.mark.parametrize("pod", ["front", "back"])
async def test_deadline(start_pods: StartPods, pod: str) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods[pod].kernel
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(DeadlineExceeded):
            await k.call(Sleep(seconds=5), timeout_s=0.2)
        assert loop.time() - t0 < 1.0
        assert (await k.call(Sleep(seconds=0.01), timeout_s=2)).slept_s == 0.01


@pytest.mark.parametrize("timeout_s", [0.0, -1.0, 0.001])
@pytest.mark.parametrize("pod", ["front", "back"])
async def test_a_deadline_already_passed_fires(start_pods: StartPods, pod: str, timeout_s: float) -> None:
    """The deadline wheel cancels a call whose deadline is behind its sweep position (a
    local call with ``timeout_s <= 0`` used to run to completion)."""
    async with start_pods(TWO_PODS) as pods:
        k = pods[pod].kernel
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded):
            await k.call(Sleep(seconds=2), timeout_s=timeout_s)
        assert asyncio.get_running_loop().time() - t0 < 1.0


@pytest.mark.parametrize("pod", ["front", "back"])
async def test_overloaded_at_once_when_queue_full(start_pods: StartPods, pod: str) -> None:
    async with start_pods(TWO_PODS) as pods:
        k = pods[pod].kernel  # probe.sleep: concurrency 2, queue 2
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        results = await asyncio.gather(*(k.call(Sleep(seconds=0.3)) for _ in range(7)), return_exceptions=True)
        kinds = sorted(type(r).__name__ for r in results)
        assert kinds == ["Overloaded"] * 3 + ["Slept"] * 4
        over = [r for r in results if isinstance(r, Overloaded)]
        assert all(o.retryable for o in over)
        assert loop.time() - t0 < 1.5


async def test_unavailable_names_the_subject(start_pods: StartPods, prefix: str) -> None:
    async with start_pods(TWO_PODS) as pods:
        with pytest.raises(Unavailable, match=f"{prefix}.nobody.home"):
            await pods["front"].kernel.call(Unserved(), timeout_s=2)


async def test_plugin_may_only_call_declared_contracts(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        probe = pods["front"].plugins[PROBE]
        with pytest.raises(UndeclaredCall, match="add it to probe's `calls`"):
            await probe.kernel.call(WhoAmI())


async def test_a_plugin_reaches_kernel_parts_only_through_granted_privileges(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        probe = pods["front"].plugins[PROBE]
        for hidden in ("jobs", "bus", "submissions", "_anything"):
            with pytest.raises(AttributeError, match="kernel handle has no"):
                getattr(probe.kernel, hidden)
        granted = pods["front"].kernel.caller_for("probe", (), frozenset({"jobs"}))
        assert granted.jobs is pods["front"].kernel.jobs
        with pytest.raises(ValueError, match="unknown privileges \\['bus'\\]"):
            pods["front"].kernel.caller_for("probe", (), frozenset({"bus"}))


async def test_schema_mismatch_is_a_clear_error(start_pods: StartPods) -> None:
    class Sleep(Request[Nobody], tag="probe.sleep"):  # same address, different schema
        seconds: float
        extra: str = ""

    async with start_pods(TWO_PODS) as pods:
        with pytest.raises(SchemaMismatch, match="deploy the same contract version"):
            await pods["back"].kernel.call(Sleep(seconds=0.1))


async def test_ops_endpoint_health_ready_metrics(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        front = pods["front"]
        await front.kernel.call(Ask(text="hello"))
        status, body = await _get(front.ops.port, "/health")
        assert status == 200 and b'"ok"' in body
        status, body = await _get(front.ops.port, "/ready")
        assert status == 200 and b'"ready": true' in body
        status, body = await _get(front.ops.port, "/metrics")
        assert status == 200 and b'aiwfe_handled_seconds_count{contract="probe.ask",path="local"}' in body
        status, _ = await _get(front.ops.port, "/nope")
        assert status == 404


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_cluster_status_lists_every_pod(start_pods: StartPods) -> None:
    async with start_pods(TWO_PODS) as pods:
        status = await pods["front"].kernel.cluster_status(0.3)
        assert [s["pod"] for s in status] == ["back", "front"]
        assert all(s["ready"] for s in status)
        assert status[0]["plugins"] == ["perception", "reasoning", WHO]


async def test_a_ready_pod_sets_its_gc_thresholds_and_restores_them_when_stopped(prefix: str) -> None:
    import gc

    before = gc.get_threshold()
    m = parse_manifest(f'[system]\nsubject_prefix = "{prefix}"\ngc_thresholds = [12345, 7, 9]\n[pods.p]\nplugins = []\n', env={})
    async with PodRunner(m, "p", LocalBus(prefix), ops_port=0):
        assert gc.get_threshold() == (12345, 7, 9)
        assert gc.get_freeze_count() > 0  # the start's objects are out of the collector's scans
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_retry_hint_travels_with_the_error_and_is_omitted_when_unknown() -> None:
    from aiwfe.kernel.errors import Overloaded, RemoteError, as_remote, from_wire, to_wire

    raw = to_wire(Overloaded("busy", retry_after_s=2.5))
    back = from_wire(raw)
    assert isinstance(back, Overloaded) and back.retryable and back.retry_after_s == 2.5
    assert b"retry_after_s" not in to_wire(Overloaded("busy"))
    assert from_wire(to_wire(Overloaded("busy"))).retry_after_s is None

    class Saturated(Exception):
        retryable = True
        retry_after_s = 4.0

    remote = from_wire(to_wire(as_remote(Saturated("later"))))
    assert isinstance(remote, RemoteError) and remote.type == "Saturated" and remote.retry_after_s == 4.0
    # an older reader's header (no hint) still decodes
    assert from_wire(b'{"type":"Overloaded","message":"m","retryable":true}').retry_after_s is None
