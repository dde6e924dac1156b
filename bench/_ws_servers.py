"""The baseline servers of ``aiwfe bench ws``: the bare echo, and the relay (the floor of the
same work without AIWFE).

**echo**: a bare Litestar WebSocket echo, under the gateway's ASGI server, protocol and
garbage-collector settings: what a socket and a frame cost before any work.

**relay**: the gateway phase's work done with the bare libraries and nothing of AIWFE (no
kernel, contracts' preamble, limits, fair queues, deadlines, liveness, metrics, auth). The
same Litestar server as the echo decodes each ``call`` frame (msgspec, its input straight into
:class:`~aiwfe.plugins.perception.contract.Perceive`), sends the input as msgpack with
nats-py's own ``request`` to a **responder** process (plain nats-py queue subscription) that
decodes it, runs the same ``PerceptionPlugin.perceive`` and answers msgpack; the relay
answers the socket ``{"type": "reply", "id", "result"}`` as the gateway does. So the gateway
phase minus the relay phase is what AIWFE's own layers cost per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from typing import Any

import msgspec

from aiwfe.plugins.perception.contract import Perceive, Perception

__all__ = ["serve_echo", "serve_responder"]


class _CallFrame(msgspec.Struct):
    input: Perceive
    id: str = ""


class _ReplyFrame(msgspec.Struct, tag="reply", tag_field="type"):
    id: str
    result: Perception


async def serve_echo(server_name: str, port: int, relay_nats: str = "", subject: str = "") -> None:
    """Run the echo (or, with ``relay_nats``, the relay to ``subject`` through that NATS) until
    stdin closes; prints ``READY <ws url>``."""
    from litestar import Litestar, WebSocket, websocket

    from aiwfe.kernel.manifest import System
    from aiwfe.plugins.gateway.server import EmbeddedGranian, EmbeddedServer

    @websocket("/echo")
    async def echo(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        with contextlib.suppress(Exception):
            while True:
                await socket.send_text(await socket.receive_text())

    nc: Any = None

    @websocket("/echo")
    async def relay(socket: WebSocket[Any, Any, Any]) -> None:
        decode, encode = msgspec.json.Decoder(_CallFrame).decode, msgspec.json.Encoder().encode
        to_bus, from_bus = msgspec.msgpack.Encoder().encode, msgspec.msgpack.Decoder(Perception).decode
        await socket.accept()
        with contextlib.suppress(Exception):
            while True:
                frame = decode(await socket.receive_text())
                reply = await nc.request(subject, to_bus(frame.input), timeout=30)
                await socket.send_text(encode(_ReplyFrame(id=frame.id, result=from_bus(reply.data))).decode())

    if relay_nats:
        import nats

        nc = await nats.connect(relay_nats)
    server_cls: Any = EmbeddedGranian if server_name == "granian" else EmbeddedServer
    server = server_cls(
        Litestar(route_handlers=[relay if relay_nats else echo]),
        host="127.0.0.1",
        port=port,
        reuse_port=True,
        max_frame_bytes=65536,
        ping_interval_s=20,
        ping_timeout_s=20,
        backlog=8192,
    )
    await server.start()
    # The same collector settings as a pod (kernel.pod), so that the baseline differs from
    # the gateway only by the gateway's own work.
    gc.set_threshold(*System().gc_thresholds)
    gc.freeze()
    print(f"READY ws://127.0.0.1:{server.bound_port}/echo", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop()
    if nc is not None:
        await nc.close()


async def serve_responder(nats_url: str, subject: str) -> None:
    """The relay's worker: perception's ``perceive`` behind a plain nats-py queue subscription
    (nats-py's callback model: one request after another; perceive does not wait), until
    stdin closes."""
    import nats

    from aiwfe.kernel.manifest import System
    from aiwfe.plugins.perception.plugin import PerceptionPlugin

    plugin = PerceptionPlugin(PerceptionPlugin.Config(), object())
    decode, encode = msgspec.msgpack.Decoder(Perceive).decode, msgspec.msgpack.Encoder().encode

    async def on_request(msg: Any) -> None:
        await msg.respond(encode(await plugin.perceive(decode(msg.data))))

    nc = await nats.connect(nats_url)
    await nc.subscribe(subject, "relay", cb=on_request)
    await nc.flush()
    gc.set_threshold(*System().gc_thresholds)
    gc.freeze()
    print("READY -", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await nc.close()
