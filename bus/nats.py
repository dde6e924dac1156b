"""NatsBus: core request/reply and fan-out, JetStream for the work queue, streams and the bucket.

Choices (after reading nats-py 2.16's defaults):

* ``max_reconnect_attempts=-1``: nats-py gives up after 60 attempts by default; a pod
  never gives up. ``reconnect_time_wait=0.5`` s (default 2 s) so traffic resumes soon
  after the server returns; ``ping_interval=5`` s (default 120 s) so a dead server is
  noticed in seconds, not minutes.
* RPC rides core NATS with a queue group per subject, so replicas share the load.
  Every request is its own task, so a slow handler never blocks the subscription.
* The work queue, the streams and the bucket are in :mod:`aiwfe.bus.nats_queue` and
  :mod:`aiwfe.bus.nats_streams`; this module holds the connection and core NATS.

Liveness of calls. A request over core NATS is answered by whichever queue-group member
took it; if that process dies (``kill -9``, a lost connection, a cancelled handler) nothing
else ever answers, and the caller used to wait out its whole deadline. Now a kernel call
(:meth:`NatsBus.request` without headers: its metadata rides in the call preamble) marks
its reply token (``codec.LIVE_MARK``), and a serving pod, every ``codec.HEARTBEAT_S``
(0.5 s), publishes one heartbeat per caller connection to ``<its inbox>.<codec.ALIVE_TOKEN>``
naming the marked calls that have run for at least that long — waiting for a slot or
running. A call heard of neither by reply nor by heartbeat for ``codec.LIVENESS_WINDOW_S``
(2 s) fails with :class:`~aiwfe.bus.errors.CalleeLost` (``_client.FastClient``), so a dead
callee is noticed 1.5 to 2.5 s after its last heartbeat, while one that keeps beating may
run to the call's deadline. Calls shorter than 0.5 s never see a heartbeat: the fast path
costs a dict entry on either side and one timer every 0.25 s while live calls are pending.

Compatibility: callers that do not mark their token get no heartbeats; heartbeats go to a
token no request uses, which nats-py's and the older kernel's request muxes drop, and only
to inboxes (``codec.is_reply_inbox``, same as replies). Pods need publish permission on
``_INBOX.*.*._alive`` (:mod:`aiwfe.kernel.tools.natsauth` grants it); a caller of this
version calling a pod of an older one sees calls longer than 2 s fail with CalleeLost, so
pods are upgraded together, as for any change of the call preamble. JetStream API calls and
requests with headers (JSON, external publishers) are not followed: nothing heartbeats them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import unquote

import nats
import nats.errors
from nats.aio.msg import Msg

from ._client import FastClient
from .base import EventHandler, Headers, RemoteHandler
from .codec import ALIVE_TOKEN, HEARTBEAT_S, LIVE_MARK, is_reply_inbox, stream_names
from .errors import BusTimeout, CalleeLost, NoResponders, NotConnected
from .nats_connect import NatsConnectOptions, connect_first, redact_url
from .nats_queue import QueueMixin
from .nats_streams import StreamsMixin
from .wheel import DeadlineWheel

__all__ = ["NatsBus", "user_inbox"]

log = logging.getLogger("aiwfe.bus.nats")


def user_inbox(url: str, options: NatsConnectOptions | None = None) -> str:
    """``_INBOX.<user>`` for a user/password login (``options.user``, else the URL's first
    ``user:password@``), else ``_INBOX``. A token never names an inbox: it is a secret."""
    if options is not None and (options.token or options.creds_file or options.nkey_seed_file):
        return "_INBOX"
    if options is not None and options.user:
        return f"_INBOX.{options.user}"
    for part in url.split(","):
        userinfo, at, _ = part.strip().split("://", 1)[-1].rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if at and colon and user:
            return f"_INBOX.{unquote(user)}"
    return "_INBOX"


#: nats-py's errors for a connection that cannot take a message now: closed, draining, or
#: lost with the buffer it keeps meanwhile full (a bus error, so callers see Unavailable).
_UNUSABLE = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError, nats.errors.OutboundBufferLimitError)


class NatsBus(QueueMixin, StreamsMixin):
    """A bus over NATS at ``url`` (several servers: comma-separated); subjects under ``prefix``.

    ``replicas``: JetStream replicas of the streams and the results bucket (3 on a
    three-node cluster, so losing a node loses nothing).

    ``connect_timeout_s`` bounds the first connection (None: keep trying forever, what
    a pod does while NATS is not up yet); once connected it reconnects forever. A refusal
    (wrong credentials, a certificate that does not verify) fails at once.

    ``connect_options``: credentials and TLS (:class:`~aiwfe.bus.nats_connect.NatsConnectOptions`);
    the URL's userinfo works too. ``url`` keeps the URL with its password redacted.

    ``inbox_prefix``: where replies to this connection's requests and its JetStream
    deliveries go. None: ``_INBOX.<user>`` for a user/password login (``connect_options.user``
    or the URL's ``user:password@``), the only inboxes that user may subscribe to under the
    least-privilege permissions of :mod:`aiwfe.kernel.tools.natsauth`; else nats-py's ``_INBOX``.

    ``manage_streams``: create (or update) the streams and the results bucket on start, what
    every pod does. False for a client that only makes requests (``aiwfe publish`` with the
    ``publisher`` user, who may not touch the JetStream API): nothing is created, and the
    stream and bucket operations are not available.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "aiwfe",
        *,
        name: str = "aiwfe",
        connect_timeout_s: float | None = 10.0,
        event_ttl_s: float = 3600.0,
        result_ttl_s: float = 86400.0,
        dlq_ttl_s: float = 7 * 86400.0,
        replicas: int = 1,
        connect_options: NatsConnectOptions | None = None,
        inbox_prefix: str | None = None,
        manage_streams: bool = True,
    ) -> None:
        self.url = redact_url(url)
        self._url = url
        self.connect_options = connect_options or NatsConnectOptions()
        self.inbox_prefix = inbox_prefix or user_inbox(url, self.connect_options)
        self.prefix = prefix
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.event_ttl_s = event_ttl_s
        self.result_ttl_s = result_ttl_s
        self.dlq_ttl_s = dlq_ttl_s
        self.replicas = replicas
        self.manage_streams = manage_streams
        self.names = stream_names(prefix)
        self.nc: FastClient | None = None
        self.js: Any = None
        self._kv: Any = None
        self._wheel = DeadlineWheel()
        self._subs: list[Any] = []
        self._followers: set[Any] = set()
        #: Requests dropped because their reply subject was not an inbox (codec.is_reply_inbox).
        self.refused_replies = 0
        self._inflight: set[asyncio.Task[Any]] = set()
        # Requests of callers that follow heartbeats → (reply subject, loop time taken).
        self._beating: dict[asyncio.Task[Any], tuple[str, float]] = {}
        self._beater: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._closing = False
        QueueMixin.__init__(self)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect and create the streams and the results bucket.

        Raises:
            NotConnected: refused, or no connection within ``connect_timeout_s``.
            ConnectOptionError: a connection setting is unusable (names it).
        """

        async def on_error(e: Exception) -> None:
            log.debug("nats: %r", e)

        async def on_disconnect() -> None:
            if self._closing:
                log.debug("nats: connection to %s closed", self.url)
            else:
                log.warning("nats: disconnected from %s", self.url)

        async def on_reconnect() -> None:
            log.warning("nats: reconnected to %s", self.url)
            t = asyncio.get_running_loop().create_task(self._refollow())
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)

        nc = self.connect_options.client(self._url)
        await connect_first(
            nc,
            self._url,
            self.connect_options,
            self.connect_timeout_s,
            on_error,
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py sleeps on it; floats work
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=3,
            inbox_prefix=self.inbox_prefix,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        self.nc = nc
        self.js = nc.jetstream()
        if self.manage_streams:
            await self._ensure_streams()

    def ready(self) -> str | None:
        """None when connected, else why not."""
        if self.nc is None:
            return "NATS: not connected yet"
        if not self.nc.is_connected:
            return f"NATS: {'reconnecting' if self.nc.is_reconnecting else 'disconnected'} ({self.url})"
        return None

    async def flush(self) -> None:
        """PING/PONG round trip: the server has processed our subscriptions. nats-py waits with
        ``asyncio.wait_for``, which on 3.11 drops a cancellation landing with the PONG: raised here."""
        task = asyncio.current_task()
        before = task.cancelling() if task is not None else 0
        await self._conn().flush(timeout=5)
        if task is not None and task.cancelling() > before:
            raise asyncio.CancelledError

    async def stop_taking_work(self) -> None:
        """Unsubscribe request and message handlers and stop fetching deliveries."""
        self._stopping = True
        await self._stop_fetching()
        # together: a request server's unsubscribe waits for the server to confirm it (FastClient)
        await asyncio.gather(*(sub.unsubscribe() for sub in self._subs), return_exceptions=True)
        self._subs.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight handlers; at the limit nak unsettled deliveries and cancel the rest.

        Returns True when everything finished in time.
        """
        pending = self._inflight | self._delivery_tasks
        still = (await asyncio.wait(pending, timeout=timeout_s))[1] if pending else set()
        if not still:
            return True
        await self._hand_back()  # redelivered at once to another replica instead of after the ack wait
        for t in still:
            t.cancel()
        await asyncio.gather(*still, return_exceptions=True)
        return False

    async def close(self) -> None:
        """Flush and close the connection."""
        await self.stop_taking_work()
        self._closing = True
        if self._beater is not None:
            self._beater.cancel()
            await asyncio.gather(self._beater, return_exceptions=True)
            self._beater = None
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self.nc.close()

    # -- core NATS ---------------------------------------------------------------

    def _conn(self) -> FastClient:
        if self.nc is None or self.nc.is_closed:
            raise NotConnected("NATS connection is closed")
        return self.nc

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Core NATS request. One without ``headers`` is a kernel call (metadata in the call
        preamble) and follows the callee's heartbeats (module docstring).

        Raises:
            BusTimeout, NoResponders, NotConnected (also: lost with the outbound buffer full),
            CalleeLost (no reply nor heartbeat within the liveness window).
        """
        nc = self._conn()
        try:
            # not nats-py's request: its asyncio.wait_for drops a cancellation that lands with the reply (3.11)
            msg = await nc.call(subject, data, timeout_s, self._wheel, headers, live=headers is None)
        except CalleeLost as e:
            raise CalleeLost(f"{subject}: the pod serving the call went silent ({e})") from None
        except nats.errors.NoRespondersError:
            raise NoResponders(f"no pod serves {subject}") from None
        except nats.errors.TimeoutError:
            raise BusTimeout(f"{subject}: no reply within {timeout_s * 1000:.0f} ms") from None
        except _UNUSABLE as e:
            raise NotConnected(f"{subject}: NATS connection unusable ({e!r})") from None
        return msg.data, msg.headers

    async def request_many(self, subject: str, data: bytes, timeout_s: float) -> list[bytes]:
        """One request, every reply that arrives within ``timeout_s``."""
        nc = self._conn()
        inbox = nc.new_inbox()
        out: list[bytes] = []

        async def on_msg(msg: Msg) -> None:
            out.append(msg.data)

        sub = await nc.subscribe(inbox, cb=on_msg)
        try:
            await nc.publish(subject, data, reply=inbox)
            await asyncio.sleep(timeout_s)
        finally:
            await sub.unsubscribe()
        return out

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Core NATS publish.

        Raises:
            NotConnected: the connection is closed, draining, or lost with its outbound
                buffer full (nats-py's ``OutboundBufferLimitError``).
        """
        try:
            await self._conn().publish(subject, data, headers=headers)
        except _UNUSABLE as e:
            raise NotConnected(f"{subject}: NATS connection unusable ({e!r})") from None

    async def serve(self, subject: str, handler: RemoteHandler, *, queue: bool = True) -> None:
        """Subscribe ``subject`` (queue group = subject unless ``queue`` is False); each
        request runs in its own task, started straight from the client's read loop
        (``FastClient.subscribe_requests``: no Msg, queue or extra task wake-up per request).

        What bounds the tasks (nats-py's pending-message limit no longer applies on this
        path): each task runs before the read loop reads again, and the first thing it does
        is the handler's admission (``aiwfe.kernel.limiter``): past a contract's
        ``concurrency`` + ``max_queue`` it answers ``Overloaded`` at once and ends. So the
        tasks alive at a time are at most the handlers' slots and queues plus one read's
        worth of requests."""
        nc = self._conn()
        loop = asyncio.get_running_loop()
        inflight = self._inflight
        beating = self._beating
        current_task = asyncio.current_task

        parse_headers = nc.parse_headers
        publish = nc.publish_checked  # the reply subject is checked below (is_reply_inbox)

        async def respond(reply: str, raw_headers: bytes, payload: bytes) -> None:
            # The task removes itself: a done-callback would cost one more loop turn per request.
            try:
                try:
                    request_headers = await parse_headers(raw_headers) if raw_headers else None
                except Exception as e:  # a header block nats-py cannot read: nothing to answer to
                    log.debug("%s: request with unreadable headers dropped: %r", subject, e)
                    return
                data, headers = await handler(payload, request_headers)
                if reply:
                    try:
                        await publish(reply, "", data, headers)
                    except Exception as e:
                        log.warning("reply on %s lost: %r", subject, e)
            finally:
                task = current_task()
                inflight.discard(task)  # type: ignore[arg-type]
                beating.pop(task, None)  # type: ignore[arg-type]

        def on_request(raw_reply: bytes, raw_headers: bytes, payload: bytes) -> None:
            # Called from the client's read loop (FastClient.subscribe_requests): it must not raise.
            try:
                reply = raw_reply.decode()
            except UnicodeDecodeError:
                reply = "\ufffd"  # refused just below, as any reply subject that is not an inbox
            if reply and not is_reply_inbox(reply):
                # A reply subject that is not an inbox would be written with this pod's
                # permissions (codec.is_reply_inbox): the request is dropped unanswered.
                self.refused_replies += 1
                log.debug("%s: request with reply subject %r dropped (not an inbox)", subject, reply[:80])
                return
            task = loop.create_task(respond(reply, raw_headers, payload))
            inflight.add(task)
            if reply and reply.rpartition(".")[2][:1] == LIVE_MARK:
                beating[task] = (reply, loop.time())
                if self._beater is None:
                    self._beater = loop.create_task(self._beat())

        self._subs.append(await nc.subscribe_requests(subject, subject if queue else "", on_request))

    async def _beat(self) -> None:
        """Every HEARTBEAT_S until close: one heartbeat per caller inbox naming its calls
        that have run for HEARTBEAT_S or more (module docstring), in messages of at most 32 KiB."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            nc = self.nc
            if nc is None or not nc.is_connected or not self._beating:
                continue
            due = loop.time() - HEARTBEAT_S
            by_inbox: dict[str, list[bytes]] = {}
            for task, (reply, t0) in list(self._beating.items()):
                if task.done():  # cancelled before it ever ran: its finally never ran either
                    del self._beating[task]
                elif t0 <= due:
                    inbox, _, token = reply.rpartition(".")
                    by_inbox.setdefault(inbox, []).append(token.encode())
            for inbox, tokens in by_inbox.items():
                chunk: list[bytes] = []
                size = 0
                for i, raw in enumerate(tokens):
                    chunk.append(raw)
                    size += len(raw) + 1
                    if size >= 32768 or i == len(tokens) - 1:
                        try:
                            await nc.publish(f"{inbox}.{ALIVE_TOKEN}", b" ".join(chunk))
                        except Exception as e:  # the connection went; the calls' callers will see it
                            log.debug("heartbeat to %s lost: %r", inbox, e)
                        chunk, size = [], 0

    async def subscribe(self, subject: str, handler: EventHandler, *, until_close: bool = False) -> None:
        """Subscribe ``subject`` without a queue group (every pod gets every message)."""
        nc = self._conn()
        loop = asyncio.get_running_loop()
        inflight = self._inflight

        async def on_msg(msg: Msg) -> None:
            t: asyncio.Task[None] = loop.create_task(handler(msg.data, msg.headers))  # type: ignore[arg-type]
            inflight.add(t)
            t.add_done_callback(inflight.discard)

        sub = await nc.subscribe(subject, cb=on_msg)
        if not until_close:
            self._subs.append(sub)
