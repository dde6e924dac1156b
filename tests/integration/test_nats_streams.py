"""NatsBus's lean per-job operations (publishes, record creates and reads through
FastClient.call) keep the semantics of nats-py's own paths, edge cases included."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from aiwfe.bus.codec import stream_names
from aiwfe.bus.errors import NotAccepted
from aiwfe.bus.nats import NatsBus

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


async def test_records_are_created_once_read_directly_and_recreated_over_a_delete(nats_url: str, prefix: str) -> None:
    bus = NatsBus(nats_url, prefix)
    await bus.start()
    try:
        assert bus._kv._direct  # a bucket this bus creates answers direct reads
        assert await bus.kv_get("j1") is None
        assert await bus.kv_create("j1", b"first") is True
        assert await bus.kv_create("j1", b"second") is False
        assert await bus.kv_get("j1") == b"first"
        await bus.kv_delete("j1")  # a replay deletes the record: the next outcome is written anew
        assert await bus.kv_get("j1") is None
        assert await bus.kv_create("j1", b"again") is True
        assert await bus.kv_get("j1") == b"again"
        # keys that are not plain tokens never reach a subject
        for bad in ("a b", "a.>", "*", "", ".a", "a\r\nPUB x 1"):
            assert await bus.kv_get(bad) is None
            with pytest.raises(NotAccepted, match="invalid key"):
                await bus.kv_create(bad, b"x")
    finally:
        await bus.close()


async def test_enqueue_dedupes_and_append_returns_sequences(nats_url: str, prefix: str) -> None:
    bus = NatsBus(nats_url, prefix)
    await bus.start()
    try:
        await bus.accept_kinds(["k.one"])  # the jobs stream takes only the kinds pods accept
        assert await bus.enqueue("k.one", b"x", {"Aiwfe-Schema": "s"}, "m1") is True
        assert await bus.enqueue("k.one", b"x", {}, "m1") is False  # the same id within the window
        with pytest.raises(NotAccepted, match="no stream takes this kind"):
            await bus.enqueue("k.other", b"x", {}, "m2")  # a kind nobody accepted is not kept
        s1 = await bus.append(f"{prefix}.events.j", b"a", {"Aiwfe-Type": "t"})
        s2 = await bus.append(f"{prefix}.events.j", b"b", {}, msg_id="e2")
        assert s2 == s1 + 1
        with pytest.raises(NotAccepted):
            await bus.append(f"{prefix}.nostream.x", b"a", {})  # no stream takes the subject
    finally:
        await bus.close()


async def test_a_bucket_without_direct_reads_still_works(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:  # a bucket created before direct reads were turned on
        await nc.jetstream().create_key_value(bucket=stream_names(prefix)["results"], history=1, direct=False)
    finally:
        await nc.close()
    bus = NatsBus(nats_url, prefix)
    await bus.start()
    try:
        assert not bus._kv._direct
        assert await bus.kv_get("j") is None
        assert await bus.kv_create("j", b"v") is True
        assert await bus.kv_get("j") == b"v"
        info = await bus.js.stream_info(f"KV_{stream_names(prefix)['results']}")
        assert not info.config.allow_direct  # the bucket was left as it was
    finally:
        await bus.close()


async def test_replies_on_the_request_mux_reach_their_callers(nats_url: str, prefix: str) -> None:
    """FastClient hands request-mux replies straight to their futures: nats-py's own
    ``request`` (the JetStream API), ``call``, headers, no-responders and late replies still behave."""
    bus = NatsBus(nats_url, prefix)
    await bus.start()
    try:
        nc = bus.nc
        assert nc is not None and nc._resp_sid in nc._subs
        await bus.accept_kinds(["k.one"])  # creates the jobs stream
        info = await bus.js.stream_info(stream_names(prefix)["jobs"])  # nats-py's request path
        assert info.config.name == stream_names(prefix)["jobs"]
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.call(f"{prefix}.nobody", b"x", 1.0, bus._wheel)

        async def echo(msg: Msg) -> None:
            if msg.data == b"h":
                await nc.publish(msg.reply, b"h!", headers={"H": "v"})
            else:
                await msg.respond(msg.data + b"!")

        async def slow(msg: Msg) -> None:
            await asyncio.sleep(0.3)
            await msg.respond(b"late")

        await nc.subscribe(f"{prefix}.echo", cb=echo)
        await nc.subscribe(f"{prefix}.slow", cb=slow)
        replies = await asyncio.gather(*(nc.call(f"{prefix}.echo", str(i).encode(), 2.0, bus._wheel) for i in range(50)))
        assert [r.data for r in replies] == [f"{i}!".encode() for i in range(50)]
        with_headers = await nc.call(f"{prefix}.echo", b"h", 2.0, bus._wheel)
        assert with_headers.data == b"h!" and with_headers.headers == {"H": "v"}
        with pytest.raises(nats.errors.TimeoutError):
            await nc.call(f"{prefix}.slow", b"", 0.05, bus._wheel)
        await asyncio.sleep(0.5)  # the late reply arrives for nobody and is dropped
        assert not nc._resp_map
        assert (await nc.call(f"{prefix}.echo", b"again", 2.0, bus._wheel)).data == b"again!"
    finally:
        await bus.close()


@pytest.mark.parametrize("bus_kind", ["nats", "local"])
async def test_a_bounded_read_takes_only_the_newest_messages(nats_url: str, prefix: str, bus_kind: str) -> None:
    from aiwfe.bus.local import LocalBus

    bus = NatsBus(nats_url, prefix) if bus_kind == "nats" else LocalBus(prefix)
    await bus.start()
    try:
        for i in range(10):
            await bus.append(f"{prefix}.dlq.{'a' if i % 2 else 'b'}", str(i).encode(), {})
        every = await bus.read(f"{prefix}.dlq.>")
        assert [m.data for m in every] == [str(i).encode() for i in range(10)]
        assert [m.data for m in await bus.read(f"{prefix}.dlq.>", 3)] == [b"7", b"8", b"9"]
        assert [m.data for m in await bus.read(f"{prefix}.dlq.a", 4)] == [b"7", b"9"]  # filtered among the newest 4
        assert len(await bus.read(f"{prefix}.dlq.>", 1000)) == 10
    finally:
        await bus.close()
