"""A nats-py Client with cheaper header encoding and parsing.

nats-py 2.16 validates every header key with a regex and every header-name character
with ``str.isspace`` on each message; with the two or three headers the kernel sends
per call that cost ~30 % of request/reply throughput (measured by ``aiwfe bench rpc``).
This subclass keeps the wire format and the validation rules but caches the encoded
form of header names it has already validated and parses header blocks with bytes
operations. Replies on the request mux are handed straight to their futures instead of
through the mux subscription's queue and task (a quarter of the client CPU of a JetStream
round trip, ``aiwfe bench jobs``). It overrides private methods of nats-py
(``_parse_header_lines``, ``_send_publish``, ``_init_request_sub``, ``_process_msg``,
``_remove_sub``, ``_send_unsubscribe``, ``_send_command``, ``_send_ping``, ``_process_pong``:
these also fix nats-py's ``flush()``, a flush given up on, the unsubscribe of a request
server and a cancellation while the outbound buffer is full), so
pyproject pins nats-py to the 2.x series these were read from;
``tests/unit/test_bus_client.py`` checks the header handling against nats-py's own
implementation, ``tests/integration/test_nats_streams.py`` the reply path.

A ``live`` call also follows its callee's liveness heartbeats (:mod:`aiwfe.bus.nats`,
"Liveness of calls"): its token carries :data:`~aiwfe.bus.codec.LIVE_MARK`, heartbeats
arriving on the mux token :data:`~aiwfe.bus.codec.ALIVE_TOKEN` refresh it, and a sweep every
quarter second fails the ones heard of neither by reply nor by heartbeat for
:data:`~aiwfe.bus.codec.LIVENESS_WINDOW_S` with :class:`~aiwfe.bus.errors.CalleeLost`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from nats.aio import client as _nc
from nats.aio.msg import Msg
from nats.protocol import command as _cmd

from .codec import ALIVE_TOKEN, LIVE_MARK, LIVENESS_WINDOW_S
from .errors import CalleeLost
from .wheel import DeadlineWheel

__all__ = ["FastClient"]

_CRLF = b"\r\n"
_HDR_START = b"NATS/1.0\r\n"
_PING = b"PING\r\n"
_key_cache: dict[str, bytes] = {}
_SWEEP_S = 0.25
_UNSUB_CONFIRM_S = 1  # how long a request server's unsubscribe waits for the server to confirm it


def _encode_headers(headers: dict[str, Any]) -> bytes:
    parts = [_HDR_START]
    for k, v in headers.items():
        kb = _key_cache.get(k)
        if kb is None:
            key = k.strip()
            if not key:
                continue
            if not _nc._HEADER_KEY_RE.fullmatch(key):
                raise _nc.errors.BadHeaderError(key)
            kb = key.encode() + b": "
            if len(_key_cache) < 4096:
                _key_cache[k] = kb
        v = v.strip()
        if "\r" in v or "\n" in v:
            v = v.translate(_nc._HEADER_VALUE_NEWLINES)
        parts.append(kb)
        parts.append(v.encode())
        parts.append(_CRLF)
    parts.append(_CRLF)
    return b"".join(parts)


log = logging.getLogger("aiwfe.bus")
_RawCb = Callable[[bytes, bytes, bytes], None]


class FastClient(_nc.Client):
    """nats-py's Client with faster header handling (same wire format) and a leaner request."""

    _call_seq = 0
    _resp_prefix_str = ""

    def __init__(self) -> None:
        super().__init__()
        # sid -> callback(subject, raw header block, payload) of subscribe_raw subscriptions
        self._raw_subs: dict[int, Callable[[bytes, bytes, bytes], None]] = {}
        # sid -> callback(reply, raw header block, payload) of subscribe_requests subscriptions
        self._request_subs: dict[int, Callable[[bytes, bytes, bytes], None]] = {}
        # sids of request subscriptions unsubscribed, still served until the server confirms it
        self._unsubscribing: set[int] = set()
        # live call token -> loop time it was last heard of (sent, or named by a heartbeat)
        self._live: dict[str, float] = {}
        self._live_sweep: asyncio.TimerHandle | None = None

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            name = name.strip()
            if not name or b" " in name or b"\t" in name or b"\x0b" in name or b"\x0c" in name:
                continue
            try:
                key = name.decode("ascii")
            except UnicodeDecodeError:
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        if subject == "":
            raise _nc.errors.BadSubjectError
        if headers is None:
            pub_cmd = _cmd.pub_cmd(subject, reply, payload)
        else:
            pub_cmd = _cmd.hpub_cmd(subject, reply, _encode_headers(headers), payload)
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(pub_cmd)
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        """Queue a command; past ``max_pending_size`` (the server reads slower than we write),
        wait for the flusher, as nats-py does, but let a cancellation through.

        nats-py 2.16 waits inside ``_flush_pending``, which swallows CancelledError: a task
        cancelled there (``asyncio.timeout``, ``wait_for``, ``NatsBus.wait_idle``) went on as if
        nothing had happened, so a timeout around a publish to a stalled server never fired."""
        if priority:
            self._pending.insert(0, cmd)
        else:
            self._pending.append(cmd)
        self._pending_data_size += len(cmd)
        if self._max_pending_size <= 0 or self._pending_data_size <= self._max_pending_size:
            return
        flusher, queue = self._flusher_task, self._flush_queue
        if not self.is_connected or flusher is None or flusher.done() or queue is None:
            await self._flush_pending()  # nothing to wait for (nats-py writes inline or keeps it)
            return
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await queue.put(future)
        try:  # asyncio.timeout, not wait_for: on 3.11 wait_for can lose a cancellation itself
            async with asyncio.timeout(self._flush_timeout):
                await future
        except TimeoutError:
            await self._error_cb(_nc.errors.FlushTimeoutError())

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """Send a PING behind every command queued before it, so its PONG means the server has them.

        nats-py 2.16 writes the PING straight to the transport while SUB and PUB commands wait
        in its pending buffer for the flusher task, so ``flush()`` could return before the server
        had seen a subscription made just before it: a pod said ready (``Pod.start``) with a
        subscription not yet in place, and a request right after got "no responders" (in
        about one in a hundred subscribe-flush-publish cycles, ``tests/integration/test_bus_client_flush.py``).
        The pending commands are written first, as the flusher would write them."""
        transport = self._transport
        assert transport, "Client.connect must be called first"
        if future is None:
            future = asyncio.get_running_loop().create_future()
        if self._pending_data_size > 0 and self.is_connected:
            transport.writelines(self._pending)
            self._pending = []
            self._pending_data_size = 0
        self._pongs.append(future)
        transport.write(_PING)
        self._pending_data_size += len(_PING)  # as nats-py does: the flusher then drains the transport
        await self._flush_pending()

    async def _process_pong(self) -> None:
        """A PONG answers the oldest PING; a flush given up on (timed out or cancelled) is skipped.

        nats-py 2.16 sets the result of that PING's future even when ``flush()`` has cancelled
        it: the InvalidStateError ends the read loop, and the connection reads nothing more
        (``flush()`` then "succeeds" without a round trip) until the stale-connection check
        reconnects it, ``max_outstanding_pings`` ping intervals later (15 to 20 s here)."""
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    _resp_sid = -1

    async def _init_request_sub(self) -> None:
        await super()._init_request_sub()
        self._resp_prefix_str = bytes(self._resp_sub_prefix or b"").decode()  # call() and call_many() init it so
        mux = self._resp_prefix_str + "*"
        self._resp_sid = next((sid for sid, sub in self._subs.items() if sub.subject == mux), -1)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        # Replies on the request mux go straight to their future: nats-py would queue each one
        # for the mux subscription's task, which then calls back to resolve the same future.
        if sid != self._resp_sid:
            raw = self._raw_subs.get(sid)
            serve = self._request_subs.get(sid) if raw is None else None
            if raw is not None or serve is not None:
                self.stats["in_msgs"] += 1
                self.stats["in_bytes"] += len(data)
                try:  # an exception here would end nats-py's read loop: nothing read until a stale ping
                    if raw is not None:
                        raw(subject, headers or b"", data)
                    elif serve is not None:
                        serve(reply, headers or b"", data)
                except Exception:
                    log.exception("NATS: callback of subscription %d failed; message dropped", sid)
                return None
            return await super()._process_msg(sid, subject, reply, data, headers)
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        token = subject[len(self._resp_sub_prefix or b"") :].decode()
        fut = self._resp_map.get(token)
        if fut is None:
            if token == ALIVE_TOKEN and self._live:
                self._heard(data)
            return None
        if fut.done():
            return None
        # A JetStream ack (most replies here) has no header block: nothing to parse.
        hdr = await self._process_headers(headers) if headers else None
        msg = self._build_message(sid, subject, reply, data, hdr)
        if msg is not None and not fut.done():
            fut.set_result(msg)
        return None

    async def subscribe_raw(self, subject: str, cb: Callable[[bytes, bytes, bytes], None]) -> Any:
        """Subscribe with a plain function called from the read loop with the message's subject,
        raw header block (``b""`` without one) and payload: no Msg, header parsing, queue or task
        per message. For a watcher of many small messages (``aiwfe bench helios`` follows every
        job event this way); ``cb`` must not block. Returns the subscription (unsubscribe it)."""
        return await self._subscribe_with(self._raw_subs, cb, subject, "")

    async def subscribe_requests(self, subject: str, queue: str, cb: Callable[[bytes, bytes, bytes], None]) -> Any:
        """Subscribe a request server (queue group ``queue``, ``""``: none) with a plain function
        called from the read loop with the request's reply subject, raw header block (``b""``
        without one; :meth:`parse_headers` reads it) and payload: no Msg, queue and task
        wake-up per request before the server's own task. ``cb`` must not block or raise."""
        return await self._subscribe_with(self._request_subs, cb, subject, queue)

    async def _subscribe_with(
        self,
        table: dict[int, Callable[[bytes, bytes, bytes], None]],
        cb: Callable[[bytes, bytes, bytes], None],
        subject: str,
        queue: str,
    ) -> Any:
        # Registered before the SUB goes out: subscribe() takes the next sid before its first
        # await, so no message of the new subscription can arrive before its callback is known.
        sid = self._sid + 1
        table[sid] = cb
        try:
            sub = await self.subscribe(subject, queue=queue)
        except BaseException:
            table.pop(sid, None)
            raise
        assert sub._id == sid, "nats-py assigned an unexpected sid"
        return sub

    async def parse_headers(self, raw: bytes) -> dict[str, str] | None:
        """The headers of a raw header block, as a subscription's Msg would carry them."""
        return await self._process_headers(raw) if raw else None

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._raw_subs.pop(sid, None)
        sub = self._subs.get(sid)
        if sid in self._request_subs and sub is not None and sub._closed and self.is_connected:
            self._unsubscribing.add(sid)  # Subscription.unsubscribe: its _send_unsubscribe removes it
        else:
            self._request_subs.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    async def _send_unsubscribe(self, sid: int, limit: int = 0) -> None:
        """A request server's subscription is served until the server has its UNSUB.

        nats-py's ``unsubscribe()`` forgets the subscription before the UNSUB is even sent, so
        the requests the server routed to it meanwhile (in the socket, or on the way) were
        dropped: their callers waited for CalleeLost or their deadline while a peer of the
        queue group could have answered (several per stop under load, ``Pod.stop``). Now the
        unsubscribe returns after a PING/PONG behind the UNSUB, the requests before it served
        (so ``NatsBus.wait_idle`` waits for them too); no request for it can come after."""
        if sid not in self._unsubscribing:
            await super()._send_unsubscribe(sid, limit)
            return
        try:
            await super()._send_unsubscribe(sid, limit)
            await self.flush(timeout=_UNSUB_CONFIRM_S)
        except Exception as e:  # lost or slow connection: the server drops the interest with it
            log.debug("NATS: unsubscribe of %d not confirmed: %r", sid, e)
        finally:
            self._unsubscribing.discard(sid)
            self._request_subs.pop(sid, None)

    def _heard(self, data: bytes) -> None:
        """A heartbeat: the calls it names (space-separated tokens) are still running."""
        now = asyncio.get_running_loop().time()
        live = self._live
        for token in data.decode("utf-8", "replace").split(" "):
            if token in live:
                live[token] = now

    def _sweep(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """Fail the live calls not heard of within the liveness window."""
        now = loop.time()
        # A sweep that runs late ran after a blocked loop: heartbeats that came meanwhile may
        # still wait unread in the socket, so the window is stretched by the lateness.
        limit = now - LIVENESS_WINDOW_S - max(0.0, now - due)
        live = self._live
        for token in [t for t, seen in live.items() if seen < limit]:
            del live[token]
            fut = self._resp_map.get(token)
            if fut is not None and not fut.done():
                fut.set_exception(CalleeLost(f"no reply and no heartbeat for {LIVENESS_WINDOW_S:g} s"))
        self._live_sweep = loop.call_at(now + _SWEEP_S, self._sweep, loop, now + _SWEEP_S) if live else None

    async def _publish_call(self, subject: str, token: str, payload: bytes, headers: dict[str, str] | None, end: float) -> None:
        """Publish a request whose reply comes to ``token`` on the mux (Client.publish's checks, inline).
        One that may wait for the flusher (a stalled server) waits until ``end`` (loop time) at most:
        a call's deadline holds before its reply is awaited (a timeout per call would cost ~4 µs)."""
        if not self._skip_subject_validation:
            _nc._validate_subject(subject)
        if self._pending_data_size + len(payload) + 65536 <= self._max_pending_size or self._max_pending_size <= 0:
            return await self.publish_checked(subject, self._resp_prefix_str + token, payload, headers)
        try:
            async with asyncio.timeout_at(end):
                await self.publish_checked(subject, self._resp_prefix_str + token, payload, headers)
        except TimeoutError:
            raise _nc.errors.TimeoutError from None

    async def publish_checked(self, subject: str, reply: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Client.publish without validating ``subject`` and ``reply`` (the caller has: a reply
        to a request whose reply subject :func:`~aiwfe.bus.codec.is_reply_inbox` accepted, or a
        request to a subject it built); the connection and size checks are Client.publish's."""
        if self.is_closed:
            raise _nc.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise _nc.errors.ConnectionDrainingError
        size = len(payload)
        if not self.is_connected and (self._max_pending_size <= 0 or size + self._pending_data_size > self._max_pending_size):
            raise _nc.errors.OutboundBufferLimitError
        if size > self._max_payload:
            raise _nc.errors.MaxPayloadError
        await self._send_publish(subject, reply, payload, size, headers)

    async def call_many(
        self, subject: str, items: list[tuple[bytes, dict[str, str] | None]], timeout_s: float, wheel: DeadlineWheel
    ) -> list[Msg]:
        """Several requests to ``subject``, sent back to back in this order (one write), then
        every reply awaited: one round trip where :meth:`call` in a loop takes ``len(items)``.

        Raises:
            nats.errors.TimeoutError: a reply did not come within ``timeout_s``.
            nats.errors.NoRespondersError: nobody subscribes to ``subject``.
        """
        if not self._resp_prefix_str:
            await self._init_request_sub()
        loop = asyncio.get_running_loop()
        resp_map = self._resp_map
        pending: list[tuple[str, asyncio.Future[Msg]]] = []
        out: list[Msg] = []
        deadline = loop.time() + timeout_s
        try:
            for payload, headers in items:
                self._call_seq += 1
                token = f"k{self._call_seq}"
                fut: asyncio.Future[Msg] = loop.create_future()
                resp_map[token] = fut
                pending.append((token, fut))
                await self._publish_call(subject, token, payload, headers, deadline)
            for _, fut in pending:
                out.append(await _reply(fut, deadline, wheel))
        finally:
            for token, _ in pending:
                resp_map.pop(token, None)
        return out

    async def call(
        self,
        subject: str,
        payload: bytes,
        timeout_s: float,
        wheel: DeadlineWheel,
        headers: dict[str, str] | None = None,
        *,
        live: bool = False,
    ) -> Msg:
        """Request/reply on nats-py's response mux, with less per-call work than ``request``.

        Tokens come from a counter and the timeout from the caller's deadline wheel, not
        ``asyncio.wait_for`` (on 3.11 it drops a cancellation that lands as the reply does).
        ``headers``: of the request. ``live``: follow the callee's heartbeats (a kernel call).

        Raises:
            nats.errors.TimeoutError: no reply within ``timeout_s``.
            nats.errors.NoRespondersError: nobody subscribes to ``subject``.
            CalleeLost: ``live`` and neither reply nor heartbeat within the liveness window.
        """
        if not self._resp_prefix_str:
            await self._init_request_sub()
        self._call_seq += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        token = f"{LIVE_MARK if live else 'k'}{self._call_seq}"
        fut: asyncio.Future[Msg] = loop.create_future()
        resp_map = self._resp_map
        resp_map[token] = fut
        try:
            await self._publish_call(subject, token, payload, headers, deadline)
            if live:  # followed from when the request has left (its publish may have waited for the server)
                self._live[token] = now = loop.time()
                if self._live_sweep is None:
                    self._live_sweep = loop.call_at(now + _SWEEP_S, self._sweep, loop, now + _SWEEP_S)
            msg = await _reply(fut, deadline, wheel)
        finally:
            resp_map.pop(token, None)
            if live:
                self._live.pop(token, None)
        return msg


async def _reply(fut: asyncio.Future[Msg], deadline: float, wheel: DeadlineWheel) -> Msg:
    """Await a reply future until ``deadline`` (loop time, on ``wheel``).

    Raises:
        nats.errors.TimeoutError: no reply by ``deadline``.
        nats.errors.NoRespondersError: the server's 503 status: nobody subscribes.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    timer = wheel.add(deadline, fut)
    try:
        msg = await fut
    except asyncio.CancelledError:  # a cancellation of the task that came with the deadline goes on
        if timer[1].expired and (task is None or task.cancelling() == before):
            raise _nc.errors.TimeoutError from None
        raise
    finally:
        wheel.remove(timer)
    if msg.headers and msg.headers.get("Status") == "503":
        raise _nc.errors.NoRespondersError
    return msg
