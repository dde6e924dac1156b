"""A client has ``LeanHttp.request_read_s`` to send a whole request (head and body), from its
connect or from the request's first byte: past it 408 in the gateway's JSON error shape and
the connection closed. uvicorn has no such timer of its own: before, a client that sent
nothing, half a head or half a body held its socket for ever. A request read whole is not
timed (the app may take as long as it needs), nor is a keep-alive connection between
requests (uvicorn's keep-alive timeout), nor an upgraded WebSocket."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from aiwfe.plugins.gateway.server import LeanHttp
from tests.support.ws_raw import RawClient, serving, upgrade_head

READ_S = 0.4


@pytest.fixture(autouse=True)
def _short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LeanHttp, "request_read_s", READ_S)


async def _timed_out(client: RawClient) -> float:
    """Seconds until the 408; checks its JSON body and that the connection then ends."""
    t0 = time.monotonic()
    status, headers = await client.http()
    waited = time.monotonic() - t0
    assert status == 408 and headers["content-type"] == "application/json"
    body = json.loads(await client.reader.readexactly(int(headers["content-length"])))
    assert body["status_code"] == 408 and "not sent within" in body["detail"]
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed by the server
    return waited


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connected, sent nothing
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Half",  # half a head
        b"POST /read HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{",  # half a body
    ],
    ids=["nothing", "half a head", "half a body"],
)
async def test_a_request_not_sent_in_time_is_answered_408_and_closed(sent: bytes) -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        if sent:
            await client.send(sent)
        assert READ_S * 0.5 < await _timed_out(client) < READ_S + 3


async def test_requests_read_whole_are_not_timed_nor_the_time_between_them() -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        for i, path in enumerate(("/slow", "/", "/slow")):  # /slow answers after 0.6 s, longer than READ_S
            if i:
                await asyncio.sleep(READ_S * 1.5)  # idle on a kept-alive connection, longer than READ_S
            await client.send(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            status, headers = await client.http()
            assert status == 200
            await client.reader.readexactly(int(headers["content-length"]))
        # a request begun after them is timed again from its first byte
        await client.send(b"GET / HTTP/1.1\r\n")
        await _timed_out(client)


async def test_an_upgraded_websocket_is_not_timed_and_oversized_heads_answer_json() -> None:
    async with serving() as server:
        ws = await RawClient.connect(server.bound_port)
        await ws.send(upgrade_head())
        assert (await ws.http())[0] == 101
        await asyncio.sleep(READ_S * 2)
        assert not ws.reader.at_eof()
        big = await RawClient.connect(server.bound_port)
        await big.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n")
        status, headers = await big.http()
        assert status == 431 and headers["content-type"] == "application/json"
        body = json.loads(await big.reader.readexactly(int(headers["content-length"])))
        assert body == {"status_code": 431, "detail": "request headers too large"}
