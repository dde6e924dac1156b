"""Limits the gateway enforces where input enters, before any handler runs.

* **Header size**: requests (HTTP and the WebSocket handshake) whose headers exceed
  ``max_header_bytes`` in total are answered 431 at once. The gateway's uvicorn protocol
  (:class:`~aiwfe.plugins.gateway.server.LeanHttp`) refuses them before the app sees them;
  :func:`guard` repeats the check in ASGI for HTTP and for servers that lack it.
* **JSON bodies**: a POST/PUT/PATCH with a body must say ``Content-Type: application/json``
  (or ``…+json``); anything else is 415, so a cross-site ``text/plain`` form post never
  reaches a JSON route. Requests without a body (logout) need no content type.
* **Frame depth**: a WebSocket frame nested deeper than ``max_frame_depth`` (arrays and
  objects) is answered ``bad_frame`` and the socket stays open (:func:`too_deep`).
* **Numbers of ``call`` frames** (:data:`CALL_RANGES`, :func:`check_ranges`): integer fields
  of the request contracts a client may call, range-checked with ``bad_frame`` naming the field
  (the plugins clamp them too, silently; a client should hear that it asked for too much).
* **Body size**: a body whose ``Content-Length`` is over ``max_body_bytes`` is answered 413
  before any of it is read (Litestar answers 413 for a chunked body once it grows past the
  limit). The connection stays open: the server discards the rest of the body as it comes,
  so a client still sending reads its 413 (closing at once resets the upload before the
  client can read the answer), and the rest is never parsed as a request of its own.
* **Body values** (:func:`check_values`): integers of free-form JSON fields must fit the bus's
  64 bits (msgpack carries no more; a bigger one failed later, as a 500 or a dead letter), and
  text bound for PostgreSQL may not hold NUL characters; 400 naming the field. The kernel's
  submit path checks job input for wide integers too (``kernel.submitting``) and the memory
  plugin refuses NUL itself, for every caller; this edge check stays beside them on purpose:
  a call to a plugin in the gateway's own pod is never encoded, so nothing else would see a
  wide integer before the plugin does, and only here is the exact path (``metadata.k[0]``) known.
* **HEAD and OPTIONS** (:func:`methods`): HEAD is answered as GET without the body, OPTIONS
  with the ``Allow`` header of the path's 405 (Litestar's own OPTIONS answer lists only the
  methods of the first handler registered on a path).
* **Sequences**: event sequences (``after_seq`` of ``resume`` frames and of the SSE query,
  ``Last-Event-ID``) must be integers in ``0 ≤ seq ≤ MAX_SEQ`` (:func:`parse_seq`), given at
  most once each over HTTP (:func:`once`), and not
  past the job's last event, finished (:func:`finished_last_seq`) or running
  (:func:`running_past_end`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

__all__ = [
    "CALL_RANGES",
    "INT_RANGE",
    "MAX_SEQ",
    "check_ranges",
    "check_values",
    "finished_last_seq",
    "guard",
    "header_bytes",
    "methods",
    "once",
    "parse_seq",
    "past_end",
    "running_past_end",
    "too_deep",
]

#: The largest event sequence a client may name (2^53 − 1: exact in every JSON parser).
MAX_SEQ = 2**53 - 1

#: Contract address → integer field → inclusive range a client may send (``call`` frames; the
#: HTTP bodies declare the same bounds on their Structs).
CALL_RANGES: dict[str, dict[str, tuple[int, int]]] = {
    "perception.perceive": {"max_tags": (0, 100)},
    "memory.recall": {"k": (1, 100)},
}

#: The integers the bus carries (msgpack): from −2^63 to 2^64 − 1.
INT_RANGE = (-(2**63), 2**64 - 1)

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def too_deep(data: str | bytes, max_depth: int) -> bool:
    """True when the JSON text ``data`` nests arrays/objects deeper than ``max_depth``.

    Cheap for ordinary frames: the scan runs only when the frame holds more than
    ``max_depth`` opening brackets at all (one C-speed count).
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return False
    depth = 0
    for m in _BRACKET.finditer(_STRING.sub(b"", raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def parse_seq(value: Any, what: str) -> int:
    """``value`` (an int or a string of ASCII digits) as an event sequence.

    Raises:
        ValueError: not an integer in ``0..MAX_SEQ``; the message names ``what``.
    """
    if isinstance(value, str):
        v = value.strip()
        if not (v.isascii() and v.isdecimal()) or len(v) > 16:  # not "٣": ASCII digits only
            raise ValueError(f"{what} must be an integer from 0 to {MAX_SEQ}")
        value = int(v)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEQ:
        raise ValueError(f"{what} must be an integer from 0 to {MAX_SEQ}")
    return value


def once(values: list[str], what: str) -> str | None:
    """The value of a query parameter or header that may be given at most once (None: not given).

    Raises:
        ValueError: given more than once (which one counts would be a guess); the message names ``what``.
    """
    if len(values) > 1:
        raise ValueError(f"{what} given {len(values)} times; send it once")
    return values[0] if values else None


def check_ranges(address: str, request: Any) -> None:
    """Check ``request``'s integer fields against :data:`CALL_RANGES`.

    Raises:
        ValueError: a field out of range (the message names it and the range).
    """
    for field, (lo, hi) in CALL_RANGES.get(address, {}).items():
        v = getattr(request, field, None)
        if isinstance(v, int) and not lo <= v <= hi:
            raise ValueError(f"{field} must be from {lo} to {hi}, got {v}")


def check_values(value: Any, field: str, *, text: bool = False) -> None:
    """Check the decoded JSON ``value`` of the body field ``field`` before it goes on the bus:
    every integer within :data:`INT_RANGE`; with ``text``, no NUL character in a string or key.

    Raises:
        ValueError: the first value found wrong, its path named (``field.key[2]``).
    """
    stack: list[tuple[str, Any]] = [(field, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if text and "\x00" in v:
                raise ValueError(f"{path}: text must not contain NUL characters")
        elif isinstance(v, dict):
            for k, item in v.items():
                key = f"{path}.{k[:40]}"
                if text and "\x00" in k:
                    raise ValueError(f"{key}: keys must not contain NUL characters")
                stack.append((key, item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool) and not INT_RANGE[0] <= v <= INT_RANGE[1]:
            raise ValueError(f"{path}: integers must be from -2^63 to 2^64-1")


def header_bytes(scope: Scope) -> int:
    """The size of a request's headers (names and values) as the ASGI scope holds them."""
    return sum(len(k) + len(v) for k, v in scope.get("headers", ()))


def _json_type(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = msgspec.json.encode({"status_code": status, "detail": detail})
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def guard(
    app: Callable[[Scope, Receive, Send], Awaitable[None]], max_header_bytes: int, max_body_bytes: int = 0
) -> Callable[..., Awaitable[None]]:
    """Wrap an ASGI app with the header-size, JSON content-type and body-size checks (see the
    module doc; ``max_body_bytes`` 0: no declared-size check here)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and header_bytes(scope) > max_header_bytes:
            detail = f"request headers exceed {max_header_bytes} bytes"
            if kind == "http":
                await _respond(send, 431, detail, [(b"connection", b"close")])
                return
            await receive()
            if "websocket.http.response" in scope.get("extensions", {}):
                body = detail.encode()
                hdrs = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
                await send({"type": "websocket.http.response.start", "status": 431, "headers": hdrs})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        if kind == "http" and scope.get("method") in ("POST", "PUT", "PATCH"):
            ctype = b""
            has_body = False
            for k, v in scope.get("headers", ()):
                if k == b"content-type":
                    ctype = v
                elif (k == b"content-length" and v.strip() not in (b"", b"0")) or k == b"transfer-encoding":
                    has_body = True
                    if k == b"content-length" and max_body_bytes and v.strip().isdigit() and int(v) > max_body_bytes:
                        await _respond(send, 413, f"the body is larger than {max_body_bytes} bytes")
                        return
            if (has_body or ctype) and not _json_type(ctype):
                await _respond(send, 415, "the body must be JSON: send Content-Type: application/json")
                return
        await app(scope, receive, send)

    return guarded


def methods(app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Wrap an HTTP app so that HEAD is answered as GET without the body (a stream is cut after
    its head) and OPTIONS with 204 and the ``Allow`` header the path's 405 carries (see the
    module doc); 404 for a path that does not exist, as for any method."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method") if scope["type"] == "http" else None
        if method == "HEAD":
            done = False

            async def headless(message: dict[str, Any]) -> None:
                nonlocal done
                if done:
                    return
                if message["type"] == "http.response.body":
                    done = True
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                await send(message)

            await app({**scope, "method": "GET"}, receive, headless)
        elif method == "OPTIONS":
            answer: list[dict[str, Any]] = []

            async def keep(message: dict[str, Any]) -> None:
                answer.append(message)

            await app({**scope, "method": "_ALLOW_"}, receive, keep)  # no route has it: the 405 names those there are
            start = answer[0] if answer else {}
            allow = [v for k, v in start.get("headers", ()) if k.lower() == b"allow"]
            if start.get("status") == 405 and allow:
                await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow[0])]})
                await send({"type": "http.response.body", "body": b""})
                return
            for message in answer:
                await send(message)
        else:
            await app(scope, receive, send)

    return wrapped


async def finished_last_seq(kernel: Any, job_id: str, after_seq: int, wait_s: float = 2.0) -> int | None:
    """The sequence of a finished job's last (terminal) event, when a resume after ``after_seq``
    needs it; None for a running job, for ``after_seq`` 0, or when it cannot be told.

    A resume at or past a finished job's last event would otherwise follow forever: the
    callers answer it (past: an error; at: the terminal event again, or SSE 204). The job's
    events are replayed once, for at most ``wait_s``.
    """
    if after_seq <= 0 or await kernel.job_record(job_id) is None:
        return None
    last = None
    try:
        async with asyncio.timeout(wait_s):
            async for ev in kernel.job_events(job_id, 0):  # ends at the terminal event
                last = ev.seq
    except TimeoutError:
        return None  # events no longer kept, or slow: do not refuse what might be valid
    return last


async def running_past_end(kernel: Any, job_id: str, after_seq: int) -> int | None:
    """For a job that has not finished: the sequence of its last event so far when
    ``after_seq`` is past it, else None. No client can have seen a later event of this job,
    and following after it would skip the job's next events (sequences are the stream's, so
    they only reach ``after_seq`` once the whole stream does): the callers refuse it."""
    if after_seq <= 0:
        return None
    last = int(await kernel.job_last_seq(job_id))
    return last if after_seq > last else None


def past_end(after_seq: int, last: int) -> str:
    """The error message of a resume past a finished job's last event."""
    return f"after_seq {after_seq} is past the job's last event ({last})"
