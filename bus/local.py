"""LocalBus: the bus in-process, with NatsBus's semantics, for unit tests and single-pod runs.

Several kernels may share one LocalBus (that is how unit tests build multi-pod
placements without NATS). Requests are routed round-robin among the handlers serving a
subject; published messages reach every subscriber; the work queue deduplicates by
message id, redelivers on nak (after its delay) and stops after ``max_deliver``
deliveries; streams keep sequences and drop repeated message ids; the bucket has
create-once writes. What jobs mean is the kernel's (``aiwfe.kernel.jobs``), the same
on either bus. Nothing survives the process: use NatsBus where durability matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections.abc import AsyncIterator, Collection
from typing import Any

from .base import ConsumerOptions, DeliveryHandler, EventHandler, Headers, RemoteHandler, StreamMessage, message_size
from .errors import BusTimeout, NoResponders, NotAccepted, PayloadTooLarge

__all__ = ["LocalBus"]


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, a final ``>`` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


class _Queued:
    __slots__ = ("data", "delivered", "enqueued_at", "headers", "seq")

    def __init__(self, seq: int, data: bytes, headers: Headers) -> None:
        self.seq, self.data, self.headers = seq, data, headers
        self.delivered = 0
        self.enqueued_at = time.time()


class _LocalDelivery:
    __slots__ = ("_bus", "_item", "_kind", "attempt", "data", "headers", "seq", "settled")

    def __init__(self, bus: LocalBus, kind: str, item: _Queued) -> None:
        self._bus, self._kind, self._item = bus, kind, item
        self.data, self.headers, self.seq, self.attempt = item.data, dict(item.headers), item.seq, item.delivered
        self.settled = False

    async def ack(self) -> None:
        self.settled = True
        self._bus._done(self._kind, self._item)

    async def term(self) -> None:
        self.settled = True
        self._bus._done(self._kind, self._item)

    async def nak(self, delay_s: float = 0.0) -> None:
        self.settled = True
        self._bus._requeue(self._kind, self._item, delay_s)

    async def in_progress(self) -> None:
        """Nothing to extend: a local delivery is redelivered only when naked or handed back."""


class LocalBus:
    """An in-process bus under ``prefix``; ``max_payload`` bounds a queued or appended
    message like NATS's server setting (default 1 MiB, NATS's default)."""

    def __init__(self, prefix: str = "aiwfe", *, max_payload: int = 1024 * 1024) -> None:
        self.prefix = prefix
        self._max_payload = max_payload
        self._kinds: set[str] = set()
        self._serve: dict[str, list[RemoteHandler]] = {}
        self._answer: dict[str, list[RemoteHandler]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._subs: dict[str, list[EventHandler]] = {}
        self._queues: dict[str, asyncio.Queue[_Queued]] = {}
        self._pending: dict[str, dict[int, _Queued]] = {}
        self._msg_ids: set[str] = set()
        self._queue_seq = itertools.count(1)
        self._streams: dict[str, list[StreamMessage]] = {}
        self._stream_ids: dict[str, int] = {}
        self._stream_seq: dict[str, itertools.count[int]] = {}
        self._appended = asyncio.Condition()
        self._kv: dict[str, bytes] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workers: list[asyncio.Task[Any]] = []
        self._unsettled: dict[int, tuple[str, _Queued, _LocalDelivery]] = {}
        self._mine: list[tuple[dict[str, list[Any]], str, Any]] = []

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to connect."""

    def ready(self) -> str | None:
        """Always ready."""
        return None

    def max_payload(self) -> int:
        """The largest message queued or appended (payload plus headers)."""
        return self._max_payload

    def _check_size(self, subject: str, data: bytes, headers: Headers | None) -> None:
        size = message_size(data, headers)
        if size > self._max_payload:
            raise PayloadTooLarge(f"{subject}: {size} bytes, over the limit of {self._max_payload}")

    async def flush(self) -> None:
        """Nothing is buffered."""

    async def stop_taking_work(self) -> None:
        """Stop the queue workers; unregister handlers."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        for table, subject, h in self._mine:
            with contextlib.suppress(ValueError):
                table[subject].remove(h)
        self._mine.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight handlers; at the limit requeue unsettled deliveries and cancel."""
        if not self._tasks:
            return True
        _, still = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        if not still:
            return True
        for kind, item, d in list(self._unsettled.values()):
            if not d.settled:
                d.settled = True
                self._requeue(kind, item, 0.0)
        self._unsettled.clear()
        for t in still:
            t.cancel()
        return False

    async def close(self) -> None:
        """Stop everything."""
        await self.stop_taking_work()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # -- request/reply and fan-out -------------------------------------------------

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Call one handler registered for ``subject`` (round-robin)."""
        handlers = self._serve.get(subject)
        if not handlers:
            raise NoResponders(f"no pod serves {subject}")
        h = handlers[next(self._rr[subject]) % len(handlers)]
        try:
            async with asyncio.timeout(timeout_s):
                return await h(data, dict(headers) if headers else None)
        except TimeoutError:
            raise BusTimeout(f"{subject}: no reply within {timeout_s * 1000:.0f} ms") from None

    async def request_many(self, subject: str, data: bytes, timeout_s: float) -> list[bytes]:
        """Every answering handler's reply."""
        return [(await h(data, None))[0] for h in list(self._answer.get(subject, ()))]

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Deliver to every subscriber (each in its own task)."""
        for h in list(self._subs.get(subject, ())):
            self._spawn(h(data, dict(headers or {})))

    async def serve(self, subject: str, handler: RemoteHandler, *, queue: bool = True) -> None:
        """Register a request handler (``queue`` False: one that answers :meth:`request_many`)."""
        table = self._serve if queue else self._answer
        table.setdefault(subject, []).append(handler)
        self._rr.setdefault(subject, itertools.count())
        self._mine.append((table, subject, handler))

    async def subscribe(self, subject: str, handler: EventHandler, *, until_close: bool = False) -> None:
        """Register a message handler."""
        self._subs.setdefault(subject, []).append(handler)
        if not until_close:
            self._mine.append((self._subs, subject, handler))

    # -- the work queue -------------------------------------------------------------

    def _queue(self, kind: str) -> asyncio.Queue[_Queued]:
        q = self._queues.get(kind)
        if q is None:
            q = self._queues[kind] = asyncio.Queue()
            self._pending[kind] = {}
        return q

    async def accept_kinds(self, kinds: Collection[str]) -> None:
        """Take ``kinds`` too."""
        self._kinds.update(kinds)

    async def job_kinds(self) -> list[str]:
        """The kinds taken now."""
        return sorted(self._kinds)

    async def retire_kind(self, kind: str) -> None:
        """Stop taking ``kind``; NotAccepted while jobs of it are queued."""
        q = self._queues.get(kind)
        if q is not None and (q.qsize() or self._pending.get(kind)):
            raise NotAccepted(f"{kind}: jobs still queued; let a pod serving it finish them first")
        self._kinds.discard(kind)

    async def enqueue(self, kind: str, data: bytes, headers: Headers, msg_id: str) -> bool:
        """Queue a message of an accepted kind unless ``msg_id`` was seen before."""
        subject = f"{self.prefix}.jobs.{kind}"
        if kind not in self._kinds:
            raise NotAccepted(f"{subject}: no stream takes this kind (no pod consumes or declares {kind})")
        self._check_size(subject, data, {**headers, "Nats-Msg-Id": msg_id})
        if msg_id in self._msg_ids:
            return False
        self._msg_ids.add(msg_id)
        item = _Queued(next(self._queue_seq), data, {**headers, "Nats-Msg-Id": msg_id})
        self._queue(kind).put_nowait(item)
        self._pending[kind][item.seq] = item
        return True

    def _done(self, kind: str, item: _Queued) -> None:
        self._pending.get(kind, {}).pop(item.seq, None)

    def _requeue(self, kind: str, item: _Queued, delay_s: float) -> None:
        q = self._queue(kind)
        if delay_s > 0:
            asyncio.get_running_loop().call_later(delay_s, q.put_nowait, item)
        else:
            q.put_nowait(item)

    async def consume(self, kind: str, options: ConsumerOptions, handler: DeliveryHandler) -> None:
        """Start ``options.concurrency`` workers for ``kind``."""
        q = self._queue(kind)
        loop = asyncio.get_running_loop()
        for _ in range(options.concurrency):
            self._workers.append(loop.create_task(self._worker(kind, q, options, handler)))

    async def _worker(self, kind: str, q: asyncio.Queue[_Queued], options: ConsumerOptions, handler: DeliveryHandler) -> None:
        while True:
            item = await q.get()
            item.delivered += 1
            if item.delivered > options.max_deliver:
                self._done(kind, item)  # the server stops redelivering
                continue
            d = _LocalDelivery(self, kind, item)
            self._unsettled[id(d)] = (kind, item, d)
            task = self._spawn(handler(d))
            task.add_done_callback(functools.partial(self._settled_or_gone, id(d)))
            # Stopping cancels the worker, not the delivery: it drains (see wait_idle).
            await asyncio.shield(task)

    def _settled_or_gone(self, key: int, _task: object) -> None:
        self._unsettled.pop(key, None)

    async def queue_stats(self, kind: str) -> tuple[int, float]:
        """(messages queued or in flight, age of the oldest)."""
        pending = self._pending.get(kind, {})
        if not pending:
            return 0, 0.0
        return len(pending), max(0.0, time.time() - min(i.enqueued_at for i in pending.values()))

    # -- streams ----------------------------------------------------------------------

    def _role(self, subject: str) -> str:
        return subject[len(self.prefix) + 1 :].split(".", 1)[0]

    async def append(self, subject: str, data: bytes, headers: Headers, msg_id: str | None = None) -> int:
        """Append to the stream of ``subject`` (a repeated ``msg_id`` is dropped)."""
        self._check_size(subject, data, {**headers, "Nats-Msg-Id": msg_id} if msg_id else headers)
        role = self._role(subject)
        if msg_id is not None:
            key = f"{role}\0{msg_id}"
            if key in self._stream_ids:
                return self._stream_ids[key]
        seq = next(self._stream_seq.setdefault(role, itertools.count(1)))
        if msg_id is not None:
            self._stream_ids[key] = seq
        self._streams.setdefault(role, []).append(StreamMessage(seq, subject, dict(headers), data))
        async with self._appended:
            self._appended.notify_all()
        return seq

    async def append_many(self, subject: str, items: list[tuple[bytes, Headers]]) -> list[int]:
        """Append each in order (see :meth:`aiwfe.bus.base.Streams.append_many`)."""
        return [await self.append(subject, data, headers) for data, headers in items]

    def _has_after(self, subject: str, seq: int) -> bool:
        return bool(self._after(subject, seq))

    def _after(self, subject: str, seq: int) -> list[StreamMessage]:
        return [m for m in self._streams.get(self._role(subject), ()) if m.seq > seq and matches(subject, m.subject)]

    async def follow(self, subject: str, after_seq: int = 0) -> AsyncIterator[StreamMessage]:
        """Replay then follow ``subject``."""
        last = after_seq
        while True:
            for m in self._after(subject, last):
                last = m.seq
                yield m
            async with self._appended:
                await self._appended.wait_for(functools.partial(self._has_after, subject, last))

    async def last_seq(self, subject: str) -> int:
        """The sequence of the last message under ``subject``, 0 for none."""
        found = [m.seq for m in self._streams.get(self._role(subject), ()) if m.subject == subject]
        return found[-1] if found else 0

    async def read(self, subject: str, last: int | None = None) -> list[StreamMessage]:
        """Every stored message under ``subject`` (``last``: among the stream's newest ``last``)."""
        stream = self._streams.get(self._role(subject), [])
        after = stream[-last].seq - 1 if last is not None and 0 < last <= len(stream) else 0
        return self._after(subject, after)

    async def delete(self, subject: str, seq: int) -> None:
        """Delete message ``seq`` of the stream holding ``subject``."""
        role = self._role(subject)
        self._streams[role] = [m for m in self._streams.get(role, ()) if m.seq != seq]

    # -- the bucket -------------------------------------------------------------------

    async def kv_create(self, key: str, value: bytes) -> bool:
        """Store once."""
        if key in self._kv:
            return False
        self._kv[key] = value
        return True

    async def kv_get(self, key: str) -> bytes | None:
        """The value, or None."""
        return self._kv.get(key)

    async def kv_delete(self, key: str) -> None:
        """Remove ``key``."""
        self._kv.pop(key, None)
