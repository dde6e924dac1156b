"""The WebSocket direct paths (the gateway's LeanWs on uvicorn, the default server): frames handed to the
connection by call and replies written at once keep the protocol's rules — order, binary
frames, UTF-8 — on LocalBus with the test auth double."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from typing import Any

import httpx

from tests.support.gateway import raw_ws_open
from tests.unit.test_gateway_http import StartGateway, login
from tests.unit.test_gateway_http import gateway as gateway  # the fixture


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    header = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _read(reader: Any) -> tuple[int, bytes]:
    """One server frame (unmasked): (opcode, payload)."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


async def test_a_burst_is_answered_in_order_binary_frames_too(gateway: StartGateway) -> None:
    async with gateway("rate_burst = 200") as s, httpx.AsyncClient(base_url=s.url) as c:
        reader, writer = await raw_ws_open(s.ws_url, await login(c), rcvbuf_bytes=1 << 16)
        # 100 frames in one write: all arrive in one read, each is answered in order
        burst = [_frame(0x1, json.dumps({"type": "ping", "id": str(i)}).encode()) for i in range(99)]
        burst.append(_frame(0x2, b'{"type": "ping", "id": "binary"}'))
        writer.write(b"".join(burst))
        ids = []
        async with asyncio.timeout(10):
            while len(ids) < 100:
                op, payload = await _read(reader)
                assert op == 0x1
                ids.append(json.loads(payload)["id"])
        assert ids == [str(i) for i in range(99)] + ["binary"]
        writer.close()


async def test_a_text_frame_that_is_not_utf8_closes_1007(gateway: StartGateway) -> None:
    async with gateway() as s, httpx.AsyncClient(base_url=s.url) as c:
        reader, writer = await raw_ws_open(s.ws_url, await login(c), rcvbuf_bytes=1 << 16)
        writer.write(_frame(0x1, b'{"type": "ping", "id": "\xff\xfe"}'))
        async with asyncio.timeout(10):
            op, payload = await _read(reader)
        assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1007
        writer.close()


async def test_frames_are_found_wherever_reads_split_or_join_them(gateway: StartGateway) -> None:
    """Whole frames, frames split inside the header or after the mask, fragmented messages,
    control frames, 126-length frames and two frames in one read: every message is found
    where it starts and answered in order."""

    def ping(i: str) -> bytes:
        return _frame(0x1, json.dumps({"type": "ping", "id": i}).encode())

    def fragment(payload: bytes, opcode: int, fin: bool) -> bytes:
        mask = os.urandom(4)
        head = struct.pack("!BB", (0x80 if fin else 0) | opcode, 0x80 | len(payload))
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    async with gateway("rate_burst = 200\nmax_frame_bytes = 1000") as s, httpx.AsyncClient(base_url=s.url) as c:
        reader, writer = await raw_ws_open(s.ws_url, await login(c), rcvbuf_bytes=1 << 16)

        async def send(*parts: bytes) -> None:
            for part in parts:  # each part its own read on the server
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.05)

        b, d = ping("b"), ping("d" * 60)
        whole = json.dumps({"type": "ping", "id": "frag"}).encode()
        await send(ping("a"))  # one whole frame
        await send(b[:3], b[3:])  # split inside the header
        await send(ping("c"))
        await send(d[:6], d[6:])  # header and mask alone, then the payload
        await send(fragment(whole[:10], 0x1, False), fragment(whole[10:], 0x0, True))  # a fragmented message
        await send(fragment(b"hb", 0x9, True))  # a ping control frame: answered with a pong
        await send(ping("L" * 200))  # a 126-length frame
        await send(ping("e") + ping("f"))  # two frames in one read
        seen: list[str] = []
        pongs = []
        async with asyncio.timeout(10):
            while len(seen) < 8:
                op, payload = await _read(reader)
                if op == 0xA:
                    pongs.append(payload)
                    continue
                assert op == 0x1
                seen.append(json.loads(payload)["id"])
        assert seen == ["a", "b", "c", "d" * 60, "frag", "L" * 200, "e", "f"]
        assert pongs == [b"hb"]
        # a frame over the size limit closes 1009
        big = _frame(0x1, b'{"type": "ping", "id": "' + b"x" * 2000 + b'"}')
        writer.write(big)
        async with asyncio.timeout(10):
            op, payload = await _read(reader)
        assert op == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009
        writer.close()
