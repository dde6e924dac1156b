"""The serving side of the kernel: one :class:`Endpoint` per contract served in a pod.

Both call paths end in :meth:`Endpoint.invoke`: the in-process path with the caller's
message object, the bus path after :meth:`Endpoint.handle_remote` decoded the payload.
Either way the handler runs under its concurrency limit and bounded queue
(:class:`Limiter`), under its deadline (the pod's deadline wheel), inside a trace span,
and its exceptions are mapped to :class:`~aiwfe.kernel.errors.RemoteError`.
Metadata is untrusted: every field is checked (:mod:`aiwfe.bus.codec`) before a slot is
taken; a deadline is capped at the handler's ``timeout_s`` and also bounds the wait for a slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from typing import Any

import msgspec

from aiwfe.bus.base import Headers
from aiwfe.bus.codec import H_ERROR, BadField, read_headers, unpack_call
from aiwfe.bus.wheel import DeadlineWheel

from . import metrics, tracing
from .contract import schema_hash
from .errors import AiwfeError, BadMessage, DeadlineExceeded, Overloaded, RemoteError, SchemaMismatch, as_remote, to_wire
from .jobs import JobContext, Jobs, _job
from .plugin import HandlerSpec, Plugin

__all__ = ["Endpoint", "Limiter", "current_deadline"]

log = logging.getLogger("aiwfe.kernel")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("aiwfe_deadline", default=None)
_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("aiwfe_traceparent", default=None)
_enc = msgspec.msgpack.Encoder()
_json_enc = msgspec.json.Encoder()


def current_deadline() -> float | None:
    """The running handler's deadline (``loop.time()`` seconds), or None outside one."""
    return _deadline.get()


class Limiter:
    """A concurrency limit with a bounded queue that answers Overloaded when full, fair
    between the keys its callers give.

    ``enter(key)`` takes a slot, waits in the queue, or raises :class:`Overloaded`;
    ``leave(key)`` gives it back. The key is the owner of the job a call serves
    (:attr:`JobContext.owner`; None for calls made outside a job). Waiters queue per key; a
    released slot goes to the keys with waiters in turn (round robin), to the oldest waiter
    of that key: one owner's many queued calls delay another owner's call by at most one
    call of each other waiting key, not by all of them. When the queue is full, an arrival
    whose key has fewer waiters than the key with the most takes the place of that key's
    newest waiter (which gets Overloaded): a flood cannot fill the queue against everyone
    else. Otherwise the arrival gets Overloaded at once. A cancelled waiter leaves the queue
    or passes on a slot handed to it meanwhile.

    ``reserve`` (default 0): the last ``reserve`` free slots are kept for keys holding fewer
    than ``reserve`` slots. A key holding ``reserve`` or more waits while no more than
    ``reserve`` are free, so owners who already run many long calls (together, too) cannot
    take the slots a light owner's call needs. Running slots are never taken back; the cost
    is that one heavy owner alone can use ``limit - reserve`` slots.
    """

    __slots__ = ("_queues", "_running", "_turn", "active", "limit", "max_queue", "name", "reserve", "waiting")

    def __init__(self, name: str, limit: int, max_queue: int, reserve: int = 0) -> None:
        if not 0 <= reserve < limit:
            raise ValueError(f"{name}: reserve {reserve} must be at least 0 and below the limit {limit}")
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self.reserve = reserve
        self.active = 0
        #: Callers queued for a slot (all keys).
        self.waiting = 0
        self._queues: dict[Any, collections.deque[asyncio.Future[None]]] = {}
        self._turn: collections.deque[Any] = collections.deque()  # keys with waiters, next first
        self._running: dict[Any, int] = {}  # slots held per key (kept only with a reserve)

    def _may_take(self, key: Any) -> bool:
        """Whether ``key`` may take a free slot now (always, without a reserve)."""
        return not self.reserve or self.limit - self.active > self.reserve or self._running.get(key, 0) < self.reserve

    def _take(self, key: Any) -> None:
        self.active += 1
        if self.reserve:
            self._running[key] = self._running.get(key, 0) + 1

    async def enter(self, key: Any = None) -> None:
        """Take a slot for ``key``. Raises Overloaded when the queue is full (see the class)."""
        # Without a reserve a free slot means nobody waits; with one, whoever waits may not
        # take the free slots, and an arrival that may runs at once.
        if self.active < self.limit and self._may_take(key):
            self._take(key)
            return
        if self.waiting >= self.max_queue:
            self._make_room(key)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = collections.deque()
            self._turn.append(key)
        q.append(fut)
        self.waiting += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.leave(key)  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._drop(key, fut)  # leave() may have dropped it already (cancelled futures are skipped)
            raise

    def leave(self, key: Any = None) -> None:
        """Release ``key``'s slot: to the oldest waiter of the next key in turn that may take it."""
        self.active -= 1
        if self.reserve:
            held = self._running[key] - 1
            if held:
                self._running[key] = held
            else:
                del self._running[key]
        turn, queues = self._turn, self._queues
        skipped = 0
        while skipped < len(turn):
            k = turn[0]
            if not self._may_take(k):
                turn.rotate(-1)
                skipped += 1
                continue
            turn.popleft()
            q = queues[k]
            fut = q.popleft()
            self.waiting -= 1
            if q:
                turn.append(k)
            else:
                del queues[k]
            if not fut.done():
                self._take(k)
                fut.set_result(None)
                return
            skipped = 0

    def _drop(self, key: Any, fut: asyncio.Future[None]) -> None:
        q = self._queues.get(key)
        if q is not None and fut in q:
            q.remove(fut)
            self.waiting -= 1
            if not q:
                del self._queues[key]
                self._turn.remove(key)

    def _make_room(self, key: Any) -> None:
        """The queue is full: refuse the newest waiter of the longest queue when ``key`` has
        fewer waiters than it by more than one, else raise Overloaded."""
        if not self._queues:  # max_queue 0: no queue at all
            raise Overloaded(f"{self.name}: {self.active} running, no queue; retry later")
        own = len(self._queues.get(key, ()))
        longest = max(self._queues, key=lambda k: len(self._queues[k]))
        q = self._queues[longest]
        if longest == key or len(q) <= own + 1:
            raise Overloaded(f"{self.name}: {self.active} running and {self.waiting} queued; retry later")
        fut = q.pop()  # stays non-empty: it was longer than own + 1 >= 1
        self.waiting -= 1
        if not fut.done():
            fut.set_exception(
                Overloaded(f"{self.name}: {self.active} running and {self.waiting} queued, a caller with fewer came; retry later")
            )


class Endpoint:
    """One contract served in this pod: decoding, limits, deadline, error mapping."""

    # fmt: off
    __slots__ = ("__weakref__", "contract", "decoder", "fn", "jobs", "json_decoder", "limiter", "m_local", "m_remote",
                 "overdue", "schema", "schema_raw", "spec", "timeout_s", "wheel")
    # fmt: on

    def __init__(self, spec: HandlerSpec, plugin: Plugin, wheel: DeadlineWheel, jobs: Jobs | None = None) -> None:
        self.spec = spec
        self.wheel = wheel
        self.jobs = jobs
        self.contract = spec.contract
        self.fn = getattr(plugin, spec.method)
        self.limiter = Limiter(spec.address, spec.options.concurrency, spec.options.max_queue)
        self.schema = schema_hash(spec.contract)
        self.schema_raw = bytes.fromhex(self.schema)
        self.decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(spec.contract)
        self.json_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(spec.contract)
        self.timeout_s = spec.options.timeout_s
        self.m_local = metrics.handled(spec.address, "local")
        self.m_remote = metrics.handled(spec.address, "remote")
        # Timers fired while their work still runs → time.monotonic() when they fired.
        self.overdue: dict[Any, float] = {}
        metrics.watch_overdue(self)

    async def invoke(self, msg: Any, deadline: float, traceparent: str | None = None) -> Any:
        """Run the handler under the limit and the deadline (both paths come here).

        ``deadline`` (loop time, finite) also bounds the wait for a slot. ``traceparent``
        (from a message, validated) parents the handler's span when tracing is on.

        Raises:
            Overloaded, DeadlineExceeded (also while waiting for a slot), RemoteError (the handler raised).
        """
        if tracing.STATE.enabled:
            with tracing.span(
                f"{self.spec.address} handle", tracing.SpanKind.SERVER, traceparent, {"aiwfe.plugin": self.spec.plugin}
            ):
                return await self._invoke(msg, deadline)
        return await self._invoke(msg, deadline)

    async def _invoke(self, msg: Any, deadline: float) -> Any:
        lim = self.limiter
        task = asyncio.current_task()
        assert task is not None
        # Ordering rule: arm the deadline before taking a slot (so it bounds the wait in the
        # queue), and take the slot inside the try whose finally releases it.
        timer = self.wheel.add(deadline, task, self.overdue)
        token = _deadline.set(deadline)
        job = _job.get()
        key = job.owner if job is not None else None
        entered = False
        try:
            await lim.enter(key)
            entered = True
            return await self.fn(msg)
        except asyncio.CancelledError:
            if timer[1].expired:
                task.uncancel()
                raise DeadlineExceeded(f"{self.spec.address}: deadline exceeded") from None
            raise
        except Exception as e:
            mapped = as_remote(e)
            if mapped is e:
                raise
            raise mapped from e
        finally:
            self.wheel.remove(timer)
            if timer[1].expired:
                self.overdue.pop(timer[1], None)
            _deadline.reset(token)
            if entered:
                lim.leave(key)

    def decode(self, data: bytes, headers: Headers | None) -> tuple[Any, bool]:
        """Decode a payload described by ``headers``; returns (message, is_json).

        Raises:
            SchemaMismatch, BadMessage (naming the bad header, or the payload's problem).
        """
        try:
            _, _, json, theirs = read_headers(headers)
        except BadField as e:
            raise BadMessage(f"{self.spec.address}: {e}") from None
        if theirs is not None and not json and theirs != self.schema:
            raise self._mismatch(theirs)
        return self._decode(self.json_decoder if json else self.decoder, data), json

    def _mismatch(self, theirs: str) -> SchemaMismatch:
        return SchemaMismatch(
            f"{self.spec.address}: caller's contract schema {theirs} differs from ours {self.schema}; "
            "deploy the same contract version to both pods"
        )

    def _decode(self, decoder: Any, data: Any) -> Any:
        try:
            return decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(f"{self.spec.address}: {e}") from None

    async def handle_remote(self, data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        """Serve one request that arrived over the bus; errors become an error header.

        Kernel callers send a call preamble (``aiwfe.bus.codec.pack_call``); external
        publishers send a bare body described by headers (JSON with ``Content-Type``).
        Never raises (but CancelledError): every request gets a reply.
        """
        t0 = time.perf_counter()
        trace_token = job_token = None
        deadline_ms: float | None
        try:
            pre = unpack_call(data)
            if pre is not None:
                deadline_ms, schema, tp, job_id, owner, body = pre
                if schema != self.schema_raw:
                    raise self._mismatch(schema.hex())
                msg, json = self._decode(self.decoder, body), False
                if job_id and self.jobs is not None:
                    job_token = _job.set(JobContext(self.jobs, job_id, owner=owner))
            else:
                deadline_ms, tp, _, _ = read_headers(headers)
                msg, json = self.decode(data, headers)
            remaining_s = self.timeout_s if deadline_ms is None or deadline_ms >= self.timeout_s * 1e3 else deadline_ms / 1e3
            if tp:
                trace_token = _trace.set(tp)
            reply = await self.invoke(msg, asyncio.get_running_loop().time() + remaining_s, tp)
            self.m_remote.observe(time.perf_counter() - t0)
            return (_json_enc.encode(reply) if json else _enc.encode(reply)), None
        except AiwfeError as e:
            metrics.failed(self.spec.address, "remote", e.code)
            return b"", {H_ERROR: to_wire(e).decode()}
        except ValueError as e:  # a malformed preamble or header (aiwfe.bus.codec.BadField)
            metrics.failed(self.spec.address, "remote", BadMessage.code)
            return b"", {H_ERROR: to_wire(BadMessage(f"{self.spec.address}: {e}")).decode()}
        except Exception as e:  # a kernel bug or an unencodable reply: still answer, never leave the caller waiting
            log.exception("%s: request failed in the kernel", self.spec.address)
            metrics.failed(self.spec.address, "remote", RemoteError.code)
            return b"", {H_ERROR: to_wire(RemoteError(type(e).__name__, f"{self.spec.address}: {e}")).decode()}
        finally:
            if trace_token is not None:
                _trace.reset(trace_token)
            if job_token is not None:
                _job.reset(job_token)
