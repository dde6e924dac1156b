"""A task cancelled in the same loop turn as its deadline fires stays cancelled.

The deadline wheel (``bus/wheel.py``) cancels a call's reply future (``FastClient.call``) or
a served handler's task (``Endpoint._invoke``), and its timer's ``expired`` flag tells that
CancelledError apart. When the task itself was cancelled in the same turn (a pod stopping,
a caller's own ``asyncio.timeout``), both saw ``expired`` and turned the cancellation into a
timeout: ``_reply`` raised nats-py's TimeoutError (the kernel's ``Unavailable``) and
``_invoke`` raised DeadlineExceeded, and the task went on as if never cancelled. Both tests
failed every run on the code before.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest

from aiwfe.bus.wheel import DeadlineWheel
from aiwfe.kernel.plugin import HandlerOptions, HandlerSpec
from aiwfe.kernel.serving import Endpoint
from tests.support.fastclient import connect_fast


class _CancelAsItFires(DeadlineWheel):
    """A wheel that cancels ``victim`` in the same callback that expires the deadlines."""

    victim: asyncio.Task[Any] | None = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        expiring = any(b <= int(loop.time() / self.tick_s) for b in self._buckets)
        super()._sweep(loop)
        if expiring and self.victim is not None:
            self.victim.cancel()


class _Slow(msgspec.Struct):
    n: int = 0


class _Plugin:
    async def handle(self, msg: _Slow) -> int:
        await asyncio.sleep(30)
        return msg.n


async def _settle(task: asyncio.Task[Any]) -> BaseException | None:
    await asyncio.wait([task], timeout=5)
    assert task.done()
    return None if task.cancelled() else task.exception()


async def test_a_call_cancelled_as_its_deadline_fires_stays_cancelled(nats_url: str, prefix: str) -> None:
    nc = await connect_fast(nats_url)
    try:
        await nc.subscribe(f"{prefix}.silent", cb=_ignore)  # a responder that never answers
        await nc.flush()
        wheel = _CancelAsItFires()
        outcomes = []
        for _ in range(5):
            task = asyncio.get_running_loop().create_task(nc.call(f"{prefix}.silent", b"x", 0.02, wheel))
            wheel.victim = task
            outcomes.append(await _settle(task))
        assert outcomes == [None] * 5  # cancelled, not nats-py's TimeoutError
    finally:
        await nc.close()


async def _ignore(msg: Any) -> None:
    pass


@pytest.mark.parametrize("outer", ["cancel", "alone"])
async def test_a_handler_cancelled_as_its_deadline_fires_stays_cancelled(outer: str) -> None:
    spec = HandlerSpec(plugin="p", method="handle", contract=_Slow, address="p.slow", kind="request", options=HandlerOptions())
    wheel = _CancelAsItFires()
    ep = Endpoint(spec, _Plugin(), wheel)  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(ep.invoke(_Slow(), asyncio.get_running_loop().time() + 0.02))
    wheel.victim = task if outer == "cancel" else None
    err = await _settle(task)
    if outer == "cancel":
        assert err is None  # cancelled, not DeadlineExceeded
    else:
        assert type(err).__name__ == "DeadlineExceeded"  # the deadline alone still says so
        assert task.cancelling() == 0
