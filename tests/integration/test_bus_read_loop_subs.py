"""FastClient's read-loop subscriptions (subscribe_raw, subscribe_requests) against a real
nats-server: what the callbacks receive, that a raising callback does not stop the client's
reading, and that unsubscribing removes them."""

from __future__ import annotations

import asyncio

import nats.aio.msg
import pytest

from tests.support.fastclient import connect_fast

pytestmark = pytest.mark.integration


async def test_callbacks_get_reply_raw_headers_and_payload_and_a_raising_one_stops_nothing(nats_url: str, prefix: str) -> None:
    nc = await connect_fast(nats_url)
    # a FastClient too: plain nats-py's flush() can return before its SUB reached the server
    # (tests/integration/test_bus_client_flush.py), and the echo below subscribes then flushes
    other = await connect_fast(nats_url)
    got: list[tuple[bytes, bytes, bytes]] = []
    raw: list[tuple[bytes, bytes, bytes]] = []

    def on_request(reply: bytes, headers: bytes, data: bytes) -> None:
        got.append((reply, headers, data))
        if data == b"boom":
            raise RuntimeError("a broken callback")

    try:
        req_sub = await nc.subscribe_requests(f"{prefix}.req", f"{prefix}.req", on_request)
        raw_sub = await nc.subscribe_raw(f"{prefix}.raw", lambda s, h, d: raw.append((s, h, d)))
        await nc.flush()
        await other.publish(f"{prefix}.req", b"plain", reply="_INBOX.x.1")
        await other.publish(f"{prefix}.req", b"with", headers={"A-B": "c"})
        await other.publish(f"{prefix}.req", b"boom")  # raises inside the read loop
        await other.publish(f"{prefix}.raw", b"after")  # still read
        await other.flush()
        async with asyncio.timeout(5):
            while len(got) < 3 or not raw:
                await asyncio.sleep(0.01)
        assert got[0] == (b"_INBOX.x.1", b"", b"plain")  # no header block: b"", not None
        assert got[1][0] == b"" and b"A-B: c" in got[1][1] and got[1][2] == b"with"
        assert await nc.parse_headers(got[1][1]) == {"A-B": "c"}
        assert raw == [(f"{prefix}.raw".encode(), b"", b"after")]

        # the client still works end to end: a request through nats-py's own path
        async def respond(m: nats.aio.msg.Msg) -> None:
            await m.respond(m.data)

        echo = await other.subscribe(f"{prefix}.echo", cb=respond)
        await other.flush()
        assert (await nc.request(f"{prefix}.echo", b"ping", timeout=5)).data == b"ping"
        await echo.unsubscribe()
        await req_sub.unsubscribe()
        await raw_sub.unsubscribe()
        assert not nc._request_subs and not nc._raw_subs
    finally:
        await nc.close()
        await other.close()
