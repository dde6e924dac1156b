"""The kernel: routes calls in-process or over the bus, with the same semantics either way.

Routing rule: a call goes in-process when the serving plugin runs in this pod and over
the bus otherwise. Jobs always go through the bus (durability is the point of a job);
events always go through the bus (fan-out to every pod). Both call paths enforce the
deadline, the handler's concurrency limit and bounded queue, and map handler
exceptions to :class:`~kernel.errors.RemoteError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec

from aiwfe.bus._wheel import DeadlineWheel
from aiwfe.bus.base import Bus, Headers, JobCall, JobOptions
from aiwfe.bus.codec import (
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_ERROR,
    H_MSG_ID,
    H_SCHEMA,
    H_TRACE,
    JSON,
    JobEvent,
    JobRecord,
    pack_call,
    unpack_call,
)

from . import metrics, tracing
from .contract import Event, Job, Message, Request, address_of, kind_of, reply_type, schema_hash
from .errors import (
    AiwfeError,
    BadMessage,
    DeadlineExceeded,
    Forbidden,
    Overloaded,
    SchemaMismatch,
    UndeclaredCall,
    as_remote,
    from_wire,
    to_wire,
)
from .plugin import HandlerSpec, Plugin

__all__ = ["Caller", "JobContext", "Kernel", "Limiter", "current_deadline", "current_job"]

log = logging.getLogger("aiwfe.kernel")
R = TypeVar("R")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("aiwfe_deadline", default=None)
_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("aiwfe_traceparent", default=None)
_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("aiwfe_job", default=None)


def current_deadline() -> float | None:
    """The running handler's deadline (``loop.time()`` seconds), or None outside one."""
    return _deadline.get()


def current_job() -> JobContext | None:
    """The job being run by the current task, or None outside a job handler."""
    return _job.get()


class Limiter:
    """A concurrency limit with a bounded queue that answers Overloaded when full.

    ``enter`` takes a slot, waits in the queue, or raises :class:`Overloaded` at once.
    A released slot is handed straight to the oldest waiter (first come, first served).
    """

    __slots__ = ("_waiters", "active", "limit", "max_queue", "name")

    def __init__(self, name: str, limit: int, max_queue: int) -> None:
        self.name = name
        self.limit = limit
        self.max_queue = max_queue
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Callers queued for a slot."""
        return len(self._waiters)

    async def enter(self) -> None:
        """Take a slot. Raises Overloaded when the queue is full."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"{self.name}: {self.active} running and {len(self._waiters)} queued; retry later")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.leave()  # the slot was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def leave(self) -> None:
        """Release a slot (to the oldest waiter when there is one)."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.active -= 1


class JobContext:
    """What a job handler can see of its job: id, attempt, and ``emit`` for progress events."""

    __slots__ = ("_bus", "attempt", "job_id", "kind", "max_deliver")

    def __init__(self, call: JobCall, bus: Bus) -> None:
        self.job_id = call.job_id
        self.kind = call.kind
        self.attempt = call.attempt
        self.max_deliver = call.max_deliver
        self._bus = bus

    @classmethod
    def borrowed(cls, job_id: str, bus: Bus) -> JobContext:
        """The context a handler sees when it serves a call made from inside job ``job_id``
        in another pod: it may add events to that job (``kind`` empty, ``attempt`` 0)."""
        return cls(JobCall(job_id=job_id, kind="", data=b"", headers={}, attempt=0, max_deliver=0), bus)

    async def emit(self, event: msgspec.Struct) -> int:
        """Append ``event`` (an Event Struct) to this job's event stream; return its sequence."""
        tag = type(event).__struct_config__.tag
        return await self._bus.emit(self.job_id, str(tag or type(event).__name__), _enc.encode(event))


_enc = msgspec.msgpack.Encoder()
_json_enc = msgspec.json.Encoder()


class Endpoint:
    """One contract served in this pod: decoding, limits, deadline, error mapping."""

    __slots__ = (
        "bus",
        "contract",
        "decoder",
        "fn",
        "json_decoder",
        "limiter",
        "m_local",
        "m_remote",
        "schema",
        "schema_raw",
        "spec",
        "timeout_s",
        "wheel",
    )  # fmt: skip

    def __init__(self, spec: HandlerSpec, plugin: Plugin, wheel: DeadlineWheel, bus: Bus | None = None) -> None:
        self.spec = spec
        self.wheel = wheel
        self.bus = bus
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

    async def invoke(self, msg: Any, deadline: float, traceparent: str | None = None) -> Any:
        """Run the handler under the limit and the deadline (both paths come here).

        ``traceparent`` (from a message) parents the handler's span when tracing is on.

        Raises:
            Overloaded, DeadlineExceeded, RemoteError (the handler raised).
        """
        if tracing.STATE.enabled:
            with tracing.span(
                f"{self.spec.address} handle", tracing.SpanKind.SERVER, traceparent, {"aiwfe.plugin": self.spec.plugin}
            ):
                return await self._invoke(msg, deadline)
        return await self._invoke(msg, deadline)

    async def _invoke(self, msg: Any, deadline: float) -> Any:
        lim = self.limiter
        await lim.enter()
        token = _deadline.set(deadline)
        task = asyncio.current_task()
        assert task is not None
        timer = self.wheel.add(deadline, task)
        try:
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
            _deadline.reset(token)
            lim.leave()

    def decode(self, data: bytes, headers: Headers | None) -> tuple[Any, bool]:
        """Decode a payload; returns (message, is_json).

        Raises:
            SchemaMismatch, BadMessage.
        """
        is_json = False
        if headers:
            if headers.get(H_CONTENT_TYPE) == JSON:
                is_json = True
            else:
                theirs = headers.get(H_SCHEMA)
                if theirs is not None and theirs != self.schema:
                    raise SchemaMismatch(
                        f"{self.spec.address}: caller's contract schema {theirs} differs from ours {self.schema}; "
                        "deploy the same contract version to both pods"
                    )
        try:
            return (self.json_decoder.decode(data) if is_json else self.decoder.decode(data)), is_json
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(f"{self.spec.address}: {e}") from None

    async def handle_remote(self, data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        """Serve one request that arrived over the bus; errors become an error header.

        Kernel callers send a call preamble (``bus.codec.pack_call``); external
        publishers send a bare body described by headers (JSON with ``Content-Type``).
        """
        t0 = time.perf_counter()
        loop_now = asyncio.get_running_loop().time()
        trace_token = job_token = None
        try:
            pre = unpack_call(data)
            is_json = False
            if pre is not None:
                deadline_ms, schema, tp, job_id, body = pre
                if schema != self.schema_raw:
                    raise SchemaMismatch(
                        f"{self.spec.address}: caller's contract schema {schema.hex()} differs from ours {self.schema}; "
                        "deploy the same contract version to both pods"
                    )
                deadline = loop_now + deadline_ms / 1000.0
                if tp:
                    trace_token = _trace.set(tp)
                if job_id and self.bus is not None:
                    job_token = _job.set(JobContext.borrowed(job_id, self.bus))
                try:
                    msg = self.decoder.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    raise BadMessage(f"{self.spec.address}: {e}") from None
            else:
                deadline = loop_now + self.timeout_s
                tp = None
                if headers:
                    d = headers.get(H_DEADLINE)
                    if d is not None:
                        deadline = loop_now + float(d) / 1000.0
                    tp = headers.get(H_TRACE)
                    if tp:
                        trace_token = _trace.set(tp)
                msg, is_json = self.decode(data, headers)
            reply = await self.invoke(msg, deadline, tp)
            self.m_remote.observe(time.perf_counter() - t0)
            return (_json_enc.encode(reply) if is_json else _enc.encode(reply)), None
        except AiwfeError as e:
            metrics.failed(self.spec.address, "remote", e.code)
            return b"", {H_ERROR: to_wire(e).decode()}
        except ValueError as e:  # a malformed preamble or deadline header
            metrics.failed(self.spec.address, "remote", BadMessage.code)
            return b"", {H_ERROR: to_wire(BadMessage(f"{self.spec.address}: {e}")).decode()}
        finally:
            if trace_token is not None:
                _trace.reset(trace_token)
            if job_token is not None:
                _job.reset(job_token)


class Kernel:
    """Routes calls for one pod. Built and started by :class:`kernel.pod.PodRunner`.

    ``endpoints`` holds the contracts served in this pod; every other contract is
    called over ``bus``.
    """

    def __init__(self, bus: Bus, *, call_timeout_s: float = 30.0) -> None:
        self.bus = bus
        self.call_timeout_s = call_timeout_s
        self.wheel = DeadlineWheel()
        self.endpoints: dict[type, Endpoint] = {}
        self.jobs: dict[type, Endpoint] = {}
        self.events: dict[type, list[Endpoint]] = {}
        self._subjects: dict[type, str] = {}
        self._reply_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}
        self._schemas: dict[type, bytes] = {}

    # -- wiring -------------------------------------------------------------------

    def add(self, spec: HandlerSpec, plugin: Plugin) -> None:
        """Register a validated handler of ``plugin`` (before :meth:`start`)."""
        ep = Endpoint(spec, plugin, self.wheel, self.bus)
        if spec.kind == "request":
            self.endpoints[spec.contract] = ep
        elif spec.kind == "job":
            self.jobs[spec.contract] = ep
        else:
            self.events.setdefault(spec.contract, []).append(ep)

    def subject(self, contract: type) -> str:
        """The NATS subject of a request or event contract: ``<prefix>.<address>``."""
        s = self._subjects.get(contract)
        if s is None:
            s = self._subjects[contract] = f"{self.bus.prefix}.{address_of(contract)}"
        return s

    async def start(self) -> None:
        """Expose this pod's handlers on the bus: requests, event subscriptions, job consumers."""
        for contract, ep in self.endpoints.items():
            await self.bus.serve(self.subject(contract), ep.handle_remote)
        for contract, eps in self.events.items():
            for ep in eps:
                await self.bus.subscribe(self.subject(contract), self._event_handler(ep))
        for contract, ep in self.jobs.items():
            o = ep.spec.options
            opts = JobOptions(
                concurrency=o.concurrency, ack_wait_s=o.ack_wait_s, max_deliver=o.max_deliver, backoff_s=o.backoff_s
            )
            await self.bus.consume(address_of(contract), opts, self._job_runner(ep))

    def _event_handler(self, ep: Endpoint) -> Any:
        async def on_event(data: bytes, headers: Headers | None) -> None:
            try:
                msg, _ = ep.decode(data, headers)
                tp = headers.get(H_TRACE) if headers else None
                await ep.invoke(msg, asyncio.get_running_loop().time() + ep.timeout_s, tp)
            except AiwfeError as e:
                metrics.failed(ep.spec.address, "remote", e.code)
                log.warning("event %s dropped: %s", ep.spec.address, e)

        return on_event

    def _job_runner(self, ep: Endpoint) -> Any:
        rt = reply_type(ep.contract)

        async def run(call: JobCall) -> bytes:
            msg, _ = ep.decode(call.data, call.headers)
            ctx = JobContext(call, self.bus)
            token = _job.set(ctx)
            deadline = asyncio.get_running_loop().time() + ep.timeout_s
            tp = call.headers.get(H_TRACE)
            try:
                if tracing.STATE.enabled:
                    attrs = {"aiwfe.job_id": call.job_id, "aiwfe.attempt": call.attempt}
                    with tracing.span(f"{ep.spec.address} job", tracing.SpanKind.CONSUMER, tp, attrs):
                        result = await ep.invoke(msg, deadline)
                else:
                    result = await ep.invoke(msg, deadline, tp)
            finally:
                _job.reset(token)
            if rt is not None and not isinstance(result, rt):
                raise TypeError(f"{ep.spec.address}: handler returned {type(result).__name__}, expected {rt.__name__}")
            return _enc.encode(result)

        return run

    # -- calling ------------------------------------------------------------------

    def _deadline_for(self, timeout_s: float | None) -> float:
        now = asyncio.get_running_loop().time()
        deadline = now + (timeout_s if timeout_s is not None else self.call_timeout_s)
        inherited = _deadline.get()
        if inherited is not None and inherited < deadline:
            deadline = inherited
        return deadline

    async def call(self, req: Request[R], *, timeout_s: float | None = None) -> R:
        """Call a request contract; in-process when served here, over the bus otherwise.

        ``timeout_s`` defaults to the system's ``call_timeout_s``; inside a handler the
        caller's own deadline caps it.

        Raises:
            DeadlineExceeded, Unavailable, Overloaded, SchemaMismatch, BadMessage, RemoteError.
        """
        contract = type(req)
        deadline = self._deadline_for(timeout_s)
        ep = self.endpoints.get(contract)
        if tracing.STATE.enabled:
            path = "local" if ep is not None else "remote"
            with tracing.span(f"{address_of(contract)} call", tracing.SpanKind.CLIENT, None, {"aiwfe.path": path}):
                if ep is not None:
                    return await ep.invoke(req, deadline)  # type: ignore[no-any-return]
                return await self._call_remote(req, contract, deadline)  # type: ignore[no-any-return]
        if ep is not None:
            t0 = time.perf_counter()
            result = await ep.invoke(req, deadline)
            ep.m_local.observe(time.perf_counter() - t0)
            return result  # type: ignore[no-any-return]
        return await self._call_remote(req, contract, deadline)  # type: ignore[no-any-return]

    async def _call_remote(self, req: Message, contract: type, deadline: float) -> Any:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise DeadlineExceeded(f"{address_of(contract)}: deadline passed before the call")
        dec = self._reply_decoders.get(contract)
        if dec is None:
            if kind_of(contract) != "request":
                raise TypeError(f"{contract.__qualname__} is a {kind_of(contract)}; use submit() or publish()")
            dec = self._reply_decoders[contract] = msgspec.msgpack.Decoder(reply_type(contract))
            self._schemas[contract] = bytes.fromhex(schema_hash(contract))
        tp = tracing.current_traceparent() if tracing.STATE.enabled else _trace.get()
        job = _job.get()
        payload = pack_call(int(remaining * 1000), self._schemas[contract], tp, _enc.encode(req), job.job_id if job else None)
        data, rh = await self.bus.request(self.subject(contract), payload, None, remaining)
        if rh is not None:
            err = rh.get(H_ERROR)
            if err is not None:
                raise from_wire(err)
        try:
            return dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(f"{address_of(contract)}: reply does not decode: {e}") from None

    async def publish(self, event: Event) -> None:
        """Publish an event to every subscriber in every pod (through the bus)."""
        contract = type(event)
        headers = {H_SCHEMA: schema_hash(contract)}
        if tracing.STATE.enabled:
            with tracing.span(f"{address_of(contract)} publish", tracing.SpanKind.PRODUCER):
                headers[H_TRACE] = tracing.current_traceparent() or ""
                await self.bus.publish(self.subject(contract), _enc.encode(event), headers)
            return
        tp = _trace.get()
        if tp:
            headers[H_TRACE] = tp
        await self.bus.publish(self.subject(contract), _enc.encode(event), headers)

    async def submit(self, job: Job[Any], *, job_id: str | None = None, idempotency_key: str | None = None) -> str:
        """Durably enqueue a job; return its id.

        ``idempotency_key`` makes the id deterministic (same key → same job, submitted once).
        """
        contract = type(job)
        if job_id is None:
            job_id = (
                uuid.uuid5(uuid.NAMESPACE_URL, f"aiwfe:{address_of(contract)}:{idempotency_key}").hex
                if idempotency_key
                else uuid.uuid4().hex
            )
        headers = {H_MSG_ID: job_id, H_SCHEMA: schema_hash(contract)}
        await self._submit(address_of(contract), _enc.encode(job), headers, job_id)
        return job_id

    async def _submit(self, address: str, data: bytes, headers: Headers, job_id: str) -> None:
        if tracing.STATE.enabled:
            with tracing.span(f"{address} submit", tracing.SpanKind.PRODUCER, None, {"aiwfe.job_id": job_id}):
                headers[H_TRACE] = tracing.current_traceparent() or ""
                await self.bus.submit(address, data, headers, job_id)
            return
        tp = _trace.get()
        if tp:
            headers[H_TRACE] = tp
        await self.bus.submit(address, data, headers, job_id)

    async def submit_json(
        self,
        address: str,
        data: bytes,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Durably enqueue a job given as JSON (the gateway's path: no contract import needed).

        The consumer decodes it against its contract and answers a bad payload by
        dead-lettering the job with a ``BadMessage`` reason. ``owner`` is recorded before
        the job is queued (:meth:`job_owner`), so whoever serves the job to clients can
        tell an unknown job from a pending one and one user's job from another's.

        Raises:
            Forbidden: ``job_id`` already belongs to another owner.
            Unavailable: JetStream did not accept the job.
        """
        if job_id is None:
            job_id = (
                uuid.uuid5(uuid.NAMESPACE_URL, f"aiwfe:{address}:{idempotency_key}").hex if idempotency_key else uuid.uuid4().hex
            )
        if owner is not None and await self.bus.claim_job(job_id, owner) != owner:
            raise Forbidden(f"job {job_id} belongs to someone else")
        headers = {H_MSG_ID: job_id, H_CONTENT_TYPE: JSON}
        await self._submit(address, data, headers, job_id)
        return job_id

    async def cancel_job(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a job: recorded as ``cancelled`` unless it already has an outcome, and
        stopped in whichever pod runs it. Returns True when this call cancelled it."""
        return await self.bus.cancel_job(job_id, reason)

    async def job_record(self, job_id: str) -> JobRecord | None:
        """The stored outcome of a job, None while pending or unknown."""
        return await self.bus.job_record(job_id)

    async def job_owner(self, job_id: str) -> str | None:
        """The owner a job was submitted with (``submit_json(owner=...)``), or None."""
        return await self.bus.job_owner(job_id)

    async def wait_job(self, job_id: str, *, timeout_s: float = 30.0, poll_s: float = 0.05) -> JobRecord:
        """Wait for a job's record.

        Raises:
            DeadlineExceeded: no record within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            rec = await self.bus.job_record(job_id)
            if rec is not None:
                return rec
            if loop.time() >= end:
                raise DeadlineExceeded(f"job {job_id} not finished after {timeout_s} s")
            await asyncio.sleep(poll_s)

    def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Replay then follow a job's events after sequence ``after_seq``."""
        return self.bus.job_events(job_id, after_seq)

    async def cluster_status(self, timeout_s: float = 0.5) -> list[dict[str, Any]]:
        """Ask every running pod for its status: ``{pod, plugins, ready, reasons, ops_url}``.

        Pods answer on ``<prefix>.control.status``; this collects the answers that arrive
        within ``timeout_s``, sorted by pod name.
        """
        return sorted(await self.bus.gather(f"{self.bus.prefix}.control.status", timeout_s), key=lambda s: str(s.get("pod")))

    def caller_for(self, plugin_name: str, allowed: tuple[type, ...]) -> Caller:
        """A :class:`Caller` restricted to the contracts a plugin declared in ``calls``."""
        return Caller(self, plugin_name, frozenset(allowed))


class Caller:
    """A plugin's handle on the kernel; it may only use the contracts it declared."""

    __slots__ = ("_allowed", "_kernel", "_plugin")

    def __init__(self, kernel: Kernel, plugin: str, allowed: frozenset[type]) -> None:
        self._kernel = kernel
        self._plugin = plugin
        self._allowed = allowed

    def _check(self, contract: type) -> None:
        if contract not in self._allowed:
            raise UndeclaredCall(
                f"plugin {self._plugin} uses {contract.__qualname__} without declaring it; add it to {self._plugin}'s `calls`"
            )

    async def call(self, req: Request[R], *, timeout_s: float | None = None) -> R:
        """See :meth:`Kernel.call`. Raises UndeclaredCall for an undeclared contract."""
        if type(req) not in self._allowed:
            self._check(type(req))
        return await self._kernel.call(req, timeout_s=timeout_s)

    async def publish(self, event: Event) -> None:
        """See :meth:`Kernel.publish`."""
        self._check(type(event))
        await self._kernel.publish(event)

    async def submit(self, job: Job[Any], *, job_id: str | None = None, idempotency_key: str | None = None) -> str:
        """See :meth:`Kernel.submit`."""
        self._check(type(job))
        return await self._kernel.submit(job, job_id=job_id, idempotency_key=idempotency_key)

    async def job_record(self, job_id: str) -> JobRecord | None:
        """See :meth:`Kernel.job_record`."""
        return await self._kernel.job_record(job_id)

    async def wait_job(self, job_id: str, *, timeout_s: float = 30.0) -> JobRecord:
        """See :meth:`Kernel.wait_job`."""
        return await self._kernel.wait_job(job_id, timeout_s=timeout_s)

    def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """See :meth:`Kernel.job_events`."""
        return self._kernel.job_events(job_id, after_seq)

    async def submit_json(
        self,
        address: str,
        data: bytes,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> str:
        """See :meth:`Kernel.submit_json` (not checked against ``calls``: the address is data)."""
        return await self._kernel.submit_json(address, data, job_id=job_id, idempotency_key=idempotency_key, owner=owner)

    async def job_owner(self, job_id: str) -> str | None:
        """See :meth:`Kernel.job_owner`."""
        return await self._kernel.job_owner(job_id)

    async def cancel_job(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """See :meth:`Kernel.cancel_job`."""
        return await self._kernel.cancel_job(job_id, reason)

    async def cluster_status(self, timeout_s: float = 0.5) -> list[dict[str, Any]]:
        """See :meth:`Kernel.cluster_status`."""
        return await self._kernel.cluster_status(timeout_s)
