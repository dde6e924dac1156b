"""The submit and status subjects of tests/unit/test_submitting.py over a real NATS server
(each pod its own connection), and the jobs stream's subjects: only accepted kinds, added
by pods starting at once, narrowed from the old catch-all."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.js import api

from aiwfe.bus.codec import stream_names
from aiwfe.bus.errors import NotAccepted
from aiwfe.bus.nats import NatsBus
from tests.unit.test_submitting import *  # noqa: F403  (the same bodies, over NATS)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


async def test_pods_starting_at_once_all_get_their_kinds_in_the_stream(nats_url: str, prefix: str) -> None:
    buses = [NatsBus(nats_url, prefix, name=f"b{i}") for i in range(4)]
    await asyncio.gather(*(b.start() for b in buses))
    try:
        await asyncio.gather(*(b.accept_kinds([f"k{i}.run", "shared.run"]) for i, b in enumerate(buses)))
        assert await buses[0].job_kinds() == ["k0.run", "k1.run", "k2.run", "k3.run", "shared.run"]
        assert await buses[1].enqueue("k2.run", b"x", {}, "m1")
        with pytest.raises(NotAccepted, match="no stream takes this kind"):
            await buses[1].enqueue("k9.run", b"x", {}, "m2")
    finally:
        await asyncio.gather(*(b.close() for b in buses))


async def test_the_old_catch_all_subject_is_narrowed_to_the_kinds(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = stream_names(prefix)["jobs"]
        await js.add_stream(api.StreamConfig(name=name, subjects=[f"{prefix}.jobs.>"], retention=api.RetentionPolicy.WORK_QUEUE))
        bus = NatsBus(nats_url, prefix)
        await bus.start()
        try:
            await bus.accept_kinds(["a.b"])
            assert (await js.stream_info(name)).config.subjects == [f"{prefix}.jobs.a.b"]
        finally:
            await bus.close()
    finally:
        await nc.close()
