"""The gateway's uvicorn WebSocket protocol: reads pause at the high-water mark, not per message."""

from __future__ import annotations

import asyncio
from typing import Any

from aiwfe.plugins.gateway.server import EmbeddedServer
from aiwfe.plugins.gateway.wsproto import LeanWs
from tests.support.gateway import raw_ws_open, raw_ws_send_text


async def test_reading_pauses_only_at_the_high_water_mark_and_resumes_when_drained() -> None:
    release = asyncio.Event()
    received: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await release.wait()  # a slow app: nothing is read until released
        while len(received) < 200:
            msg = await receive()
            if msg["type"] != "websocket.receive":
                return
            received.append(msg["text"])

    server = EmbeddedServer(app, host="127.0.0.1", port=0, max_frame_bytes=65536, ping_interval_s=0, ping_timeout_s=0)
    await server.start()
    try:
        _reader, writer = await raw_ws_open(f"ws://127.0.0.1:{server.bound_port}/", "unused")
        (proto,) = server.server.server_state.connections
        assert isinstance(proto, LeanWs)
        for i in range(LeanWs.high_water - 2):  # below the mark: reading goes on
            raw_ws_send_text(writer, f"m{i}")
        await writer.drain()
        for _ in range(100):
            if proto.queue.qsize() == LeanWs.high_water - 2:
                break
            await asyncio.sleep(0.01)
        assert not proto.read_paused
        for i in range(LeanWs.high_water - 2, 200):  # past it: the socket stops being read
            raw_ws_send_text(writer, f"m{i}")
        await writer.drain()
        for _ in range(100):
            if proto.read_paused:
                break
            await asyncio.sleep(0.01)
        assert proto.read_paused
        assert proto.queue.qsize() < 200  # bounded: the rest waits in the kernel's socket buffers
        release.set()
        for _ in range(200):
            if len(received) == 200:
                break
            await asyncio.sleep(0.01)
        assert received == [f"m{i}" for i in range(200)]  # nothing lost, in order
        assert not proto.read_paused
        writer.close()
    finally:
        await server.stop()


async def test_reuse_port_lets_two_servers_share_one_port() -> None:
    seen: set[int] = set()

    def app_for(n: int) -> Any:
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await receive()
            seen.add(n)
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1000})

        return app

    kw: dict[str, Any] = {"host": "127.0.0.1", "max_frame_bytes": 1024, "ping_interval_s": 0, "ping_timeout_s": 0}
    first = EmbeddedServer(app_for(1), port=0, reuse_port=True, **kw)
    await first.start()
    second = EmbeddedServer(app_for(2), port=first.bound_port, reuse_port=True, **kw)
    await second.start()
    try:
        assert second.bound_port == first.bound_port
        for _ in range(200):  # the kernel spreads connections over both listeners
            _reader, writer = await raw_ws_open(f"ws://127.0.0.1:{first.bound_port}/", "unused")
            writer.close()
            if seen == {1, 2}:
                break
        assert seen == {1, 2}
    finally:
        await second.stop()
        await first.stop()
