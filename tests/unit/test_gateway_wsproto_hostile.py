"""A hostile client against the gateway's uvicorn protocols (LeanHttp, LeanWs) on real sockets:
spoiled handshakes, RFC 6455 frame violations, odd read splits, clients that vanish, never
read or never answer a close. Each case asserts the bytes on the wire (status lines, close
codes) and that nothing the client does makes the server log an error."""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import socket
from collections.abc import Iterator

import pytest

from aiwfe.plugins.gateway.wsproto import LeanWs
from tests.support.ws_raw import (
    DISCONNECTS,
    KEY,
    TIMEOUT_S,
    RawClient,
    close_payload,
    frame,
    only_connection,
    serving,
    until,
    upgrade_head,
)

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def _no_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Client misbehaviour is no server error: no ERROR record (no traceback) in any test."""
    caplog.set_level(logging.DEBUG)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


# -- handshake ------------------------------------------------------------------------


def _spoil(head: bytes, old: bytes, new: bytes) -> bytes:
    assert old in head
    return head.replace(old, new)


REFUSED = {
    "no key": (upgrade_head(key=None), 400),
    "two keys": (upgrade_head(extra=f"Sec-WebSocket-Key: {KEY}\r\n"), 400),
    "key of 15 bytes": (upgrade_head(key=base64.b64encode(b"x" * 15).decode()), 400),
    "key of 17 bytes": (upgrade_head(key=base64.b64encode(b"x" * 17).decode()), 400),
    "key not base64": (upgrade_head(key="!" * 24), 400),
    "version 8": (upgrade_head(version="8"), 426),
    "no version": (_spoil(upgrade_head(), b"Sec-WebSocket-Version: 13\r\n", b""), 426),
    "POST": (_spoil(upgrade_head(), b"GET ", b"POST "), 400),
    "HTTP/1.0": (_spoil(upgrade_head(), b"HTTP/1.1", b"HTTP/1.0"), 400),
    "no Host": (upgrade_head(host=False), 400),
}


@pytest.mark.parametrize("case", REFUSED)
async def test_an_invalid_handshake_is_refused_with_the_rfc_status(case: str) -> None:
    head, status = REFUSED[case]
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        await client.send(head + frame(0x9, b"early"))  # a frame after it is not answered
        got, headers = await client.http()
        assert got == status
        if status == 426:
            assert headers["sec-websocket-version"] == "13"
        assert headers["connection"] == "close"
        body = await client.reader.read(int(headers["content-length"]))
        assert b"\x8a" not in body
        assert await client.eof()
        assert await client.reader.read() == b""  # nothing after the answer: no pong, no close frame
        await client.aclose()


ACCEPTED = {
    "Connection with two tokens": _spoil(upgrade_head(), b"Connection: Upgrade", b"Connection: keep-alive, Upgrade"),
    "upgrade token in upper case": _spoil(upgrade_head(), b"Upgrade: websocket", b"Upgrade: WebSocket"),
    "header names in odd case": _spoil(upgrade_head(), b"Sec-WebSocket-Key", b"sEC-wEBsOCKET-kEY"),
}


@pytest.mark.parametrize("case", ACCEPTED)
async def test_a_valid_handshake_in_any_spelling_is_accepted(case: str) -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        await client.send(ACCEPTED[case])
        status, headers = await client.http()
        assert status == 101
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # of KEY (RFC 6455 1.3)
        assert headers["upgrade"] == "websocket" and headers["connection"] == "Upgrade"
        await client.send(frame(0x1, b"hi"))
        assert (await client.frame())[1:] == (0x1, b"hi")
        await client.aclose()


async def test_frames_in_the_same_segment_as_the_handshake_are_not_lost() -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        # the head, a ping, a whole text message and half of the next one in one write
        second = frame(0x1, b"second")
        await client.send(upgrade_head() + frame(0x9, b"p") + frame(0x1, b"first") + second[:5])
        assert (await client.http())[0] == 101  # the 101 comes first: no frame before it
        assert (await client.frame())[1:] == (0xA, b"p")
        assert (await client.frame())[1:] == (0x1, b"first")
        await client.send(second[5:])
        assert (await client.frame())[1:] == (0x1, b"second")
        await client.aclose()


async def test_a_head_written_one_byte_at_a_time_is_accepted() -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        for byte in upgrade_head():
            await client.send(bytes((byte,)))
        assert (await client.http())[0] == 101
        for byte in frame(0x1, b"slow"):
            await client.send(bytes((byte,)))
        assert (await client.frame())[1:] == (0x1, b"slow")
        await client.aclose()


def _head_of(total: int, line: int = 100) -> bytes:
    """A handshake head of exactly ``total`` bytes (CRLFs included), padded with header lines
    of at most ``line`` bytes each (CRLF excluded)."""
    head = upgrade_head()
    pads = []
    left = total - len(head)
    while left:
        n = min(line + 2, left)
        assert n >= 5, "padding cannot end with a header line this short"
        if left - n and left - n < 5:
            n -= 5
        pads.append(b"X" * (n - 4) + b": \r\n" if n > 4 else b"")
        left -= n
    out = head[:-2] + b"".join(pads) + b"\r\n"
    assert len(out) == total
    return out


@pytest.mark.parametrize(
    ("total", "line", "status"), [(16_384, 100, 101), (16_385, 100, 431), (9_000, 8_191, 101), (9_000, 8_192, 431)]
)
async def test_head_limits_hold_to_the_byte(total: int, line: int, status: int) -> None:
    """16 KiB a head, 8 KiB a line (with its CR): at the limit accepted, one byte over 431."""
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        await client.send(_head_of(total, line))
        assert (await client.http())[0] == status
        await client.aclose()


async def test_keep_alive_requests_each_get_the_whole_head_limit_and_bodies_do_not_count() -> None:
    async with serving() as server:
        client = await RawClient.connect(server.bound_port)
        pad = b"X-Pad: " + b"p" * 8_000 + b"\r\n"
        get = b"GET /h HTTP/1.1\r\nHost: localhost\r\n" + pad * 2 + b"\r\n"  # 16 KiB less a little
        body = b"\r\n\r\n" * 8_192  # a head terminator repeated: body, not head
        post = b"POST /h HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        for request in (get, get, post, get):
            # the head split exactly at CRLF boundaries, each piece its own write
            lines = request.split(b"\r\n")
            for piece in lines[:3]:
                await client.send(piece + b"\r\n")
            await client.send(b"\r\n".join(lines[3:]))
            status, headers = await client.http()
            assert status == 200
            assert await client.reader.readexactly(int(headers["content-length"])) == b"plain http\n"
        await client.aclose()


# -- frames ---------------------------------------------------------------------------

FAILED = {
    "unmasked": (frame(0x1, b"x", mask=False), 1002),
    "rsv1": (frame(0x1, b"x", rsv=4), 1002),
    "rsv2": (frame(0x1, b"x", rsv=2), 1002),
    "rsv3": (frame(0x1, b"x", rsv=1), 1002),
    "opcode 3": (frame(0x3, b"x"), 1002),
    "opcode 7": (frame(0x7, b"x"), 1002),
    "opcode 11": (frame(0xB, b"x"), 1002),
    "opcode 15": (frame(0xF), 1002),
    "opcode 3 over the size limit": (frame(0x3, length=1 << 20), 1002),
    "fragmented ping": (frame(0x9, b"x", fin=False), 1002),
    "ping of 126 bytes": (frame(0x9, b"x" * 126), 1002),
    "close of 126 bytes": (frame(0x8, close_payload(1000, b"x" * 124)), 1002),
    "continuation first": (frame(0x0, b"x"), 1002),
    "new message inside a fragmented one": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002),
    "64-bit length, top bit set": (frame(0x2, length=1 << 63), 1002),
    "one frame over the limit": (frame(0x2, length=1_025), 1009),
    "fragments over the limit together": (frame(0x2, b"a" * 600, fin=False) + frame(0x0, length=425, fin=False), 1009),
    "text not UTF-8": (frame(0x1, b"\xc3\x28"), 1007),
    "fragmented text not UTF-8": (frame(0x1, b"ok \xe2\x82", fin=False) + frame(0x0, b"\x28"), 1007),
    "close of one byte": (frame(0x8, b"\x03"), 1002),
    "close reason not UTF-8": (frame(0x8, close_payload(1000, b"\xff")), 1007),
    **{
        f"close code {code}": (frame(0x8, close_payload(code)), 1002)
        for code in (0, 999, 1004, 1005, 1006, 1015, 1100, 2999, 5000)
    },
}


@pytest.mark.parametrize("case", FAILED)
async def test_a_protocol_violation_closes_with_its_code(case: str) -> None:
    """Only the frame header is needed: an over-size frame closes before its payload arrives."""
    data, code = FAILED[case]
    async with serving(max_size=1_024) as server:
        client = await RawClient.open(server.bound_port)
        await client.send(data)
        assert await client.close_code() == code
        assert await client.eof()
        await client.aclose()
        for _ in range(100):
            if DISCONNECTS:
                break
            await asyncio.sleep(0.01)
        assert DISCONNECTS[-1]["code"] == code  # the app hears the same code


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1014, 3000, 4999])
async def test_a_valid_close_is_answered_with_its_code(code: int) -> None:
    async with serving() as server:
        client = await RawClient.open(server.bound_port)
        await client.send(frame(0x8, close_payload(code, "bye ✓".encode())))
        assert await client.close_code() == code
        assert await client.eof()
        await client.aclose()


async def test_an_empty_close_is_answered_empty() -> None:
    async with serving() as server:
        client = await RawClient.open(server.bound_port)
        await client.send(frame(0x8))
        assert await client.close_code() is None
        await client.aclose()


async def test_pings_pongs_fragments_and_read_splits() -> None:
    async with serving() as server:
        client = await RawClient.open(server.bound_port)
        await client.send(frame(0xA, b"unsolicited"))  # ignored
        await client.send(frame(0x9, b"payload-\x00\xff"))
        assert await client.frame() == (0x8A, 0xA, b"payload-\x00\xff")
        await client.send(frame(0x9))
        assert await client.frame() == (0x8A, 0xA, b"")
        # "é" and "€" split across fragments, a ping between the fragments
        parts = [
            frame(0x1, b"caf\xc3", fin=False),
            frame(0x9, b"mid"),
            frame(0x0, b"\xa9 \xe2", fin=False),
            frame(0x0, b"\x82\xac"),
        ]
        await client.send(b"".join(parts))
        assert (await client.frame())[1:] == (0xA, b"mid")
        assert await client.frame() == (0x81, 0x1, "café €".encode())
        # many frames in one write; then a 16-bit-length frame byte by byte
        await client.send(b"".join(frame(0x1, b"m%d" % i) for i in range(200)))
        for i in range(200):
            assert (await client.frame())[2] == b"m%d" % i
        for byte in frame(0x2, b"z" * 300):
            await client.send(bytes((byte,)))
        assert await client.frame() == (0x82, 0x2, b"z" * 300)
        await client.aclose()


async def test_a_large_frame_in_many_reads_is_joined_once() -> None:
    """A 64-bit-length frame in 7 KB writes: whole at the end, and its parts are not joined
    again at each read (the work would grow with the square of the frame)."""
    big = bytes(range(256)) * 1_000
    async with serving(max_size=300_000) as server:
        client = await RawClient.open(server.bound_port)
        proto = only_connection(server)
        data = frame(0x2, big)
        for i in range(0, len(data) - 7_001, 7_001):
            await client.send(data[i : i + 7_001])
            await asyncio.sleep(0.002)  # most writes are read one by one
        await until(lambda: proto._buf is not None and proto._have == len(data) // 7_001 * 7_001)
        assert len(proto._buf) > 10 and sum(map(len, proto._buf)) == proto._have  # the reads, kept apart
        await client.send(data[len(data) // 7_001 * 7_001 :])
        assert await client.frame() == (0x82, 0x2, big)
        assert proto._buf is None


# -- lifecycle ------------------------------------------------------------------------


async def test_a_client_that_vanishes_mid_handshake_mid_frame_or_mid_send_leaves_nothing_behind() -> None:
    async with serving() as server:
        connections = server.server.server_state.connections
        client = await RawClient.connect(server.bound_port)
        await client.send(upgrade_head()[:30])
        await client.aclose()
        client = await RawClient.open(server.bound_port)
        await client.send(frame(0x1, b"x" * 1_000)[:500])
        await client.aclose()
        client = await RawClient.open(server.bound_port, "/flood")
        await client.reader.readexactly(100_000)  # the server is sending
        client.writer.transport.abort()  # a reset, not a close
        await until(lambda: not connections and not server.server.server_state.tasks)
        assert [d["code"] for d in DISCONNECTS] == [1005]  # the echo app of the second socket
        assert (await RawClient.open(server.bound_port)) is not None  # the server serves on


async def test_a_client_that_never_reads_cannot_grow_the_servers_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages wait for the transport; pings are answered, but while the client does not read
    only its last one (RFC 6455 5.5.3), so a ping flood costs no memory."""
    async with serving() as server:
        client = await RawClient.open(server.bound_port, "/flood", rcvbuf=4_096)
        proto = only_connection(server)
        await until(lambda: not proto.writable.is_set())
        await asyncio.sleep(0.1)
        assert proto.transport.get_write_buffer_size() < 128 * 1024
        client.writer.transport.abort()
        client = await RawClient.open(server.bound_port, rcvbuf=4_096)
        proto = only_connection(server)
        proto.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4_096)  # no kernel slack
        for i in range(20_000):  # 2.6 MB of pings, no read
            client.writer.write(frame(0x9, b"%05d" % i + b"p" * 120))
        await asyncio.wait_for(client.writer.drain(), TIMEOUT_S)
        await asyncio.sleep(0.1)
        assert proto.transport.get_write_buffer_size() < 128 * 1024
        pongs = []
        while not pongs or pongs[-1][:5] != b"19999":
            b0, op, payload = await client.frame()
            assert (b0, op) == (0x8A, 0xA)
            pongs.append(payload)
        assert len(pongs) < 20_000  # some were left out
        assert all(a[:5] < b[:5] for a, b in itertools.pairwise(pongs))  # in order, none twice


async def test_a_client_that_never_answers_the_close_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LeanWs, "close_timeout_s", 0.3)
    async with serving() as server:
        connections = server.server.server_state.connections
        client = await RawClient.open(server.bound_port)
        await client.send(frame(0x1, b"close:4001"))
        assert await client.close_code() == 4001
        t0 = asyncio.get_running_loop().time()
        assert await client.eof()  # no close answer: the server closes after close_timeout_s
        assert 0.25 < asyncio.get_running_loop().time() - t0 < 2
        # a client that does not even read: its socket cannot flush; it is aborted all the same
        client = await RawClient.open(server.bound_port, "/flood", rcvbuf=4_096)
        await until(lambda: not server.server.server_state.tasks)  # the app gave up sending and returned
        await until(lambda: not connections, 2)
        assert await client.eof()


async def test_keepalive_pings_are_answered_or_the_connection_closes_1011() -> None:
    async with serving(ping_s=0.05, pong_s=0.2) as server:
        client = await RawClient.open(server.bound_port)
        for _ in range(3):  # answered: the connection stays
            b0, op, payload = await client.frame()
            assert (b0, op, len(payload)) == (0x89, 0x9, 4)
            await client.send(frame(0xA, b"other") + frame(0xA, payload))  # a wrong pong is ignored
        assert (await client.frame())[1] == 0x9  # the next ping; not answered
        assert await client.close_code() == 1011
        assert await client.eof()


async def test_shutdown_closes_1012_and_refuses_a_pending_handshake_with_500() -> None:
    async with serving() as server:
        ticking = await RawClient.open(server.bound_port, "/tick")
        assert await ticking.frame() == (0x81, 0x1, b"t")
        pending = await RawClient.connect(server.bound_port)
        await pending.send(upgrade_head("/never"))
        flooded = await RawClient.open(server.bound_port, "/flood", rcvbuf=4_096)
        await until(lambda: len(server.server.server_state.connections) == 3)
        t0 = asyncio.get_running_loop().time()
        await server.stop()
        assert asyncio.get_running_loop().time() - t0 < 2  # no wait for the app or the client that does not read
        assert await ticking.close_code() == 1012
        assert (await pending.http())[0] == 500
        assert [d["code"] for d in DISCONNECTS] == [1006]  # the app waiting before its accept heard it
        assert await flooded.eof()
