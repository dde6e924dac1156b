"""aiwfe.bus.wheel: deadlines fire up to one tick late, never early, and never not at all."""

from __future__ import annotations

import asyncio

from aiwfe.bus.wheel import DeadlineWheel


async def _expires(wheel: DeadlineWheel, deadline: float) -> tuple[bool, float]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    key = wheel.add(deadline, fut)
    t0 = loop.time()
    try:
        await asyncio.wait_for(asyncio.shield(fut), 1.0)
    except asyncio.CancelledError:
        pass
    except TimeoutError:
        wheel.remove(key)
        return False, loop.time() - t0
    return key[1].expired, loop.time() - t0


async def test_past_deadlines_fire_at_the_next_sweep() -> None:
    wheel = DeadlineWheel(tick_s=0.005)
    loop = asyncio.get_running_loop()
    # one call keeps the wheel sweeping, so its cursor runs ahead of the deadlines below
    keeper: asyncio.Future[None] = loop.create_future()
    keep = wheel.add(loop.time() + 5, keeper)
    await asyncio.sleep(0.05)
    for behind_s in (0.0, 0.02, 1.0, 3600.0):
        expired, took = await _expires(wheel, loop.time() - behind_s)
        assert expired and took < 0.5, behind_s
    wheel.remove(keep)


async def test_a_past_deadline_on_an_idle_wheel_fires() -> None:
    wheel = DeadlineWheel(tick_s=0.005)
    expired, took = await _expires(wheel, asyncio.get_running_loop().time() - 10)
    assert expired and took < 0.5


async def test_never_early() -> None:
    wheel = DeadlineWheel(tick_s=0.005)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.05
    expired, _ = await _expires(wheel, deadline)
    assert expired and loop.time() >= deadline
