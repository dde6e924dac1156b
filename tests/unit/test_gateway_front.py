"""The front protocol (``plugins/gateway/front.py``) takes a WebSocket handshake that arrives
whole in the first read and hands everything else to ``LeanHttp``. Its promise: the same
answer and the same ASGI scope as the HTTP path gives for the same bytes. Each head below
is sent twice on real sockets, once with the front and once with the hand-over forced (the
path every request took before), and the two outcomes are compared; the fast path must be
taken for the plainly valid heads and never for the others."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from aiwfe.plugins.gateway.front import Front
from aiwfe.plugins.gateway.server import LeanHttp
from tests.support.ws_raw import KEY, RawClient, serving, until

SCOPES: list[dict[str, Any]] = []
Outcome = tuple[int | str, dict[str, Any] | None]
KEYS = ("type", "path", "raw_path", "query_string", "headers", "subprotocols", "root_path", "http_version", "scheme")


async def scope_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Record each WebSocket scope (and the client's host), accept, wait for the disconnect; HTTP: 200."""
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    SCOPES.append({k: scope[k] for k in KEYS} | {"client": scope["client"][0], "server": scope["server"]})
    await receive()
    await send({"type": "websocket.accept"})
    while (await receive())["type"] != "websocket.disconnect":
        pass


def head(*lines: str, line0: str = "GET /v1/ws HTTP/1.1", end: str = "\r\n") -> bytes:
    return (end.join([line0, *lines]) + end + end).encode("latin-1")


BASE = ("Host: localhost", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13")

#: Plainly valid handshakes: the front answers them itself.
FAST = {
    "plain": head(*BASE),
    "query and escapes": head(*BASE, line0="GET /v1/%77s?token=a%20b&x=1 HTTP/1.1"),
    "subprotocols": head(*BASE, "Sec-WebSocket-Protocol: bearer, tok.en"),
    "case, blanks, tabs, obs-text, repeats": head(
        "HOST:localhost",
        "upgrade: WebSocket ",
        "CONNECTION:\tkeep-alive, Upgrade\t",
        f"sec-websocket-key: {KEY}",
        "Sec-WebSocket-Version: 13",
        "X-A: 1",
        "X-A: two words\t",
        "X-Obs: caf\xe9",
        "X-Empty:",
    ),
    "bad key (refused by the handshake check)": head(*BASE[:3], "Sec-WebSocket-Key: short", BASE[4]),
    "version 8 (426)": head(*BASE[:4], "Sec-WebSocket-Version: 8"),
    "no Host (400)": head(*BASE[1:]),
}

#: Anything else goes to LeanHttp, whatever it then answers.
HANDED_OVER = {
    "HTTP/1.0": head(*BASE, line0="GET /v1/ws HTTP/1.0"),
    "POST": head(*BASE, line0="POST /v1/ws HTTP/1.1"),
    "lower-case method": head(*BASE, line0="get /v1/ws HTTP/1.1"),
    "plain GET": head("Host: localhost", line0="GET /v1/health HTTP/1.1"),
    "two Connection headers": head(*BASE, "Connection: keep-alive"),
    "two Upgrade headers": head(*BASE, "Upgrade: websocket"),
    "Connection without upgrade": head(*BASE[:2], "Connection: keep-alive", *BASE[3:]),
    "Upgrade: h2c": head(BASE[0], "Upgrade: h2c", *BASE[2:]),
    "Content-Length": head(*BASE, "Content-Length: 0"),
    "Transfer-Encoding": head(*BASE, "Transfer-Encoding: chunked"),
    "folded header": head(*BASE, "X-Fold: a", " b"),
    "bare LF": head(*BASE, end="\n"),
    "space before the colon": head(*BASE, "X-A : 1"),
    "control character": head(*BASE, "X-A: a\x01b"),
    "head over 8 KiB": head(*BASE, "X-Big: " + "b" * 8_300),
}


async def _answer(port: int, data: bytes) -> Outcome:
    """Send ``data`` in one write; the answer's status and the scope the app saw (101 only).
    A request the server keeps waiting on (it wants more bytes) is ``"waits"`` after 0.5 s,
    one it closes unanswered is ``"closed"``."""
    SCOPES.clear()
    client = await RawClient.connect(port)
    try:
        await client.send(data)
        try:
            async with asyncio.timeout(0.5):
                status, _ = await client.http()
        except TimeoutError:
            return "waits", None
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed", None
        if status == 101:
            await until(lambda: bool(SCOPES))
            return status, SCOPES[0]
        return status, None
    finally:
        await client.aclose()


async def _both(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, Outcome, Outcome]:
    """The outcome with the front, then with the hand-over forced; and how often each path ran."""
    counts = {"fast": 0, "over": 0}
    pick, hand_over = Front._websocket_head, Front._hand_over

    def counting_pick(self: Front, data: bytes) -> Any:
        found = pick(self, data)
        counts["fast"] += found is not None
        return found

    def counting_over(self: Front, data: bytes) -> None:
        counts["over"] += 1
        hand_over(self, data)

    monkeypatch.setattr(Front, "_hand_over", counting_over)
    monkeypatch.setattr(Front, "_websocket_head", counting_pick)
    async with serving(scope_app) as server:
        new = await _answer(server.bound_port, data)
        fast, over = counts["fast"], counts["over"]
        monkeypatch.setattr(Front, "_websocket_head", lambda self, data: None)
        old = await _answer(server.bound_port, data)
    return fast, over, new, old


@pytest.mark.parametrize("data", FAST.values(), ids=FAST.keys())
async def test_a_whole_valid_handshake_takes_the_fast_path_with_the_same_outcome(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, over, new, old = await _both(data, monkeypatch)
    assert (fast, over) == (1, 0)
    assert isinstance(new[0], int) and new == old  # answered, and the same way
    if new[0] == 101:
        assert new[1] is not None and new[1]["client"] == "127.0.0.1" and new[1]["server"][0] == "127.0.0.1"


@pytest.mark.parametrize("data", HANDED_OVER.values(), ids=HANDED_OVER.keys())
async def test_any_other_head_is_handed_over_with_the_same_outcome(data: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, over, new, old = await _both(data, monkeypatch)
    assert (fast, over) == (0, 1)
    assert isinstance(new[0], int) and new == old  # answered, and the same way


async def test_a_head_split_over_reads_is_handed_over_and_served() -> None:
    async with serving(scope_app) as server:
        client = await RawClient.connect(server.bound_port)
        data = FAST["plain"]
        await client.send(data[:20])
        await asyncio.sleep(0.05)
        await client.send(data[20:])
        status, _ = await client.http()
        assert status == 101
        await until(lambda: bool(SCOPES))
        assert SCOPES[-1]["path"] == "/v1/ws"


async def test_a_handed_over_request_keeps_the_time_left_from_the_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    read_s = 1.0
    monkeypatch.setattr(LeanHttp, "request_read_s", read_s)
    async with serving(scope_app) as server:
        client = await RawClient.connect(server.bound_port)
        await asyncio.sleep(0.8 * read_s)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a head: handed over
        t0 = time.monotonic()
        status, _ = await client.http()
        assert status == 408
        # Counted from the hand-over it would be ≈ read_s; from the connect it is ≈ 0.2 · read_s.
        assert time.monotonic() - t0 < 0.9 * read_s


async def test_a_connection_that_sent_nothing_is_closed_at_shutdown() -> None:
    async with serving(scope_app) as server:  # its own stop at the end finds nothing left to do
        client = await RawClient.connect(server.bound_port)
        await until(lambda: any(isinstance(c, Front) for c in server.server.server_state.connections))
        t0 = time.monotonic()
        await server.stop()
        assert time.monotonic() - t0 < 2.0  # nothing to wait for: not the graceful period (5 s)
        assert await client.eof()
        assert not server.server.server_state.connections


def _mutants(n: int, seed: int = 13) -> list[bytes]:
    """``n`` heads made from the valid ones by one to three random edits (insert, delete,
    replace a byte, or repeat a line) with bytes that matter to a parser; each keeps a
    blank line, so the front sees a whole head and must decide."""
    rng = random.Random(seed)
    alphabet = b" \t\r\n\x00\x01\x7f\x80\xff:;,/?%Aa0-_."
    out: list[bytes] = []
    bases = list(FAST.values())
    while len(out) < n:
        data = bytearray(rng.choice(bases))
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(data) - 4)  # the final blank line stays
            edit = rng.randrange(4)
            if edit == 0:
                data[at:at] = bytes([rng.choice(alphabet)])
            elif edit == 1:
                del data[at]
            elif edit == 2:
                data[at] = rng.choice(alphabet)
            else:
                lines = bytes(data).split(b"\r\n")
                i = rng.randrange(len(lines) - 2)
                lines.insert(i, lines[i])
                data = bytearray(b"\r\n".join(lines))
        if b"\r\n\r\n" in data:
            out.append(bytes(data))
    return out


async def test_mutated_heads_get_the_same_outcome_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fuzz of the fast path's boundary: 150 randomly edited handshakes (fixed seed), each
    answered by the front and by the hand-over path; every answer and scope must agree."""
    heads = _mutants(150)
    async with serving(scope_app) as server:
        new = [await _answer(server.bound_port, h) for h in heads]
        monkeypatch.setattr(Front, "_websocket_head", lambda self, data: None)
        old = [await _answer(server.bound_port, h) for h in heads]
    differ = [(h, a, b) for h, a, b in zip(heads, new, old, strict=True) if a != b]
    assert not differ, differ[:3]
    assert {a[0] for a in new} >= {101, 400}  # the fuzz reached both sides of the boundary
