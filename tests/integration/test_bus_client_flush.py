"""FastClient's ``flush()`` means what it says: when it returns, the server has every command
queued before it.

nats-py 2.16 writes the PING of ``flush()`` straight to the socket while SUB and PUB wait in its
pending buffer for the flusher task, so a flush right after a subscribe could come back before
the server had the subscription: a message published from another connection at once was
dropped, and a request got "no responders" (about one cycle in a hundred here). ``Pod.start``
flushes before it says ready, so a pod could say ready with a subscription not in place.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.fastclient import connect_fast

pytestmark = pytest.mark.integration

CYCLES = 400


async def test_the_ping_of_a_flush_goes_after_the_commands_queued_before_it(nats_url: str, prefix: str) -> None:
    nc = await connect_fast(nats_url)
    written: list[bytes] = []
    transport = nc._transport
    assert transport is not None
    write, writelines = transport.write, transport.writelines
    transport.write = lambda data: (written.append(bytes(data)), write(data))[1]  # type: ignore[method-assign]
    transport.writelines = lambda lines: (written.extend(map(bytes, lines)), writelines(lines))[1]  # type: ignore[method-assign]
    try:
        await nc.subscribe(f"{prefix}.a")
        await nc.publish(f"{prefix}.b", b"x")
        await nc.flush()
        wire = b"".join(written)
        assert wire.index(b"SUB " + f"{prefix}.a".encode()) < wire.index(b"PUB " + f"{prefix}.b".encode()) < wire.index(b"PING")
    finally:
        transport.write, transport.writelines = write, writelines  # type: ignore[method-assign]
        await nc.close()


async def test_a_subscription_is_in_place_when_flush_returns(nats_url: str, prefix: str) -> None:
    sub_side = await connect_fast(nats_url)
    pub_side = await connect_fast(nats_url)
    missed: list[int] = []
    try:
        for i in range(CYCLES):
            got = asyncio.get_running_loop().create_future()
            sub = await sub_side.subscribe_raw(f"{prefix}.s{i}", lambda s, h, d, got=got: got.done() or got.set_result(d))
            await sub_side.flush()
            await pub_side.publish(f"{prefix}.s{i}", b"%d" % i)
            await pub_side.flush()
            try:
                assert await asyncio.wait_for(got, 2.0) == b"%d" % i
            except TimeoutError:
                missed.append(i)
            await sub.unsubscribe()
        assert missed == []
    finally:
        await sub_side.close()
        await pub_side.close()


async def test_a_responder_answers_the_first_request_after_its_flush(nats_url: str, prefix: str) -> None:
    responder = await connect_fast(nats_url)
    caller = await connect_fast(nats_url)
    refused: list[int] = []

    async def echo(msg: object) -> None:
        await msg.respond(msg.data)  # type: ignore[attr-defined]

    try:
        for i in range(CYCLES):
            sub = await responder.subscribe(f"{prefix}.r{i}", cb=echo)
            await responder.flush()
            try:
                assert (await caller.request(f"{prefix}.r{i}", b"ping", timeout=2)).data == b"ping"
            except Exception as e:  # nats.errors.NoRespondersError before the fix
                refused.append(i)
                assert type(e).__name__ == "NoRespondersError", e
            await sub.unsubscribe()
        assert refused == []
    finally:
        await responder.close()
        await caller.close()
