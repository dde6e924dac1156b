"""The calling side of the kernel: routes calls in-process or over the bus, with the same
semantics either way.

Routing rule: a call goes in-process when the serving plugin runs in this pod and over
the bus otherwise. Jobs always go through the bus's work queue (durability is the point
of a job); events always go through the bus (fan-out to every pod). The kernel does all
contract encoding and decoding; the bus sees bytes. Serving is :mod:`aiwfe.kernel.serving`,
job semantics :mod:`aiwfe.kernel.jobs`.

Liveness of a remote call (:mod:`aiwfe.bus.nats` notices a lost callee in about 2 s):
no responders means the request reached nobody, so it is sent again (after 25, 50 ... 400 ms)
for at most ``NO_RESPONDERS_WAIT_S`` or half the time left, then fails with ``Unavailable``.
A lost callee may have run the handler: a contract declared ``Idempotent`` is called again
once (another replica, or the restarted pod), any other fails at once with ``PeerLost``.
Both are retryable; only the first request is on the fast path (:meth:`Kernel._call_again`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import msgspec

from aiwfe.bus import codec
from aiwfe.bus.base import Bus, Headers
from aiwfe.bus.codec import H_ERROR, H_MSG_ID, H_SCHEMA, H_TRACE, pack_call
from aiwfe.bus.errors import BusError, BusTimeout, CalleeLost, NoResponders
from aiwfe.bus.wheel import DeadlineWheel

from . import metrics, tracing
from .contract import Event, Idempotent, Job, Message, Request, address_of, kind_of, reply_type, schema_hash
from .errors import AiwfeError, BadMessage, DeadlineExceeded, PeerLost, Unavailable, UndeclaredCall, from_wire
from .jobs import JobCall, JobContext, JobRecord, Jobs, _job, _unavailable
from .plugin import HandlerSpec, Plugin
from .serving import Endpoint, _deadline, _owner, _trace, owner_of
from .submitting import Submissions

__all__ = ["Caller", "Kernel"]

log = logging.getLogger("aiwfe.kernel")
R = TypeVar("R")
_enc = msgspec.msgpack.Encoder()
#: The longest a call waits for a subject nobody serves to be served again (module docstring).
NO_RESPONDERS_WAIT_S = 2.0
#: After an optional call found no pod serving its contract, further optional calls to it fail
#: at once for this long instead of asking the server again (helios asks memory and learning
#: on every job: in a manifest without them that was two failed round trips per job).
OPTIONAL_ABSENT_S = 1.0


class Kernel:
    """Routes calls for one pod. Built and started by :class:`aiwfe.kernel.pod.PodRunner`.

    ``endpoints`` holds the contracts served in this pod; every other contract is
    called over ``bus``. ``jobs`` is the pod's job machinery on the same bus.
    """

    def __init__(self, bus: Bus, *, call_timeout_s: float = 30.0) -> None:
        self.bus = bus
        self.jobs = Jobs(bus)
        # Reading and cancelling jobs is the job store's, under the kernel's names.
        self.job_record, self.job_owner, self.job_events = self.jobs.record, self.jobs.owner, self.jobs.events
        self.job_last_seq = self.jobs.last_event_seq
        self.cancel_job = self.jobs.cancel
        self.call_timeout_s = call_timeout_s
        self.wheel = DeadlineWheel()
        self.endpoints: dict[type, Endpoint] = {}
        self.job_endpoints: dict[type, Endpoint] = {}
        self.events: dict[type, list[Endpoint]] = {}
        self._subjects: dict[type, str] = {}
        self._reply_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}
        self._absent: dict[type, tuple[float, str]] = {}  # contract -> (loop time, why): see OPTIONAL_ABSENT_S
        self._schemas: dict[type, bytes] = {}
        self.submissions = Submissions(self)

    # -- wiring -------------------------------------------------------------------

    def add(self, spec: HandlerSpec, plugin: Plugin) -> None:
        """Register a validated handler of ``plugin`` (before :meth:`start`)."""
        ep = Endpoint(spec, plugin, self.wheel, self.jobs)
        if spec.kind == "request":
            self.endpoints[spec.contract] = ep
        elif spec.kind == "job":
            self.job_endpoints[spec.contract] = ep
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
        await self.jobs.start()
        await self.submissions.start()  # before the consumers: the jobs stream must take their kinds
        for contract, ep in self.endpoints.items():
            ep.max_reply = self.bus.max_payload()
            await self.bus.serve(self.subject(contract), ep.handle_remote)
        for contract, eps in self.events.items():
            for ep in eps:
                await self.bus.subscribe(self.subject(contract), self._event_handler(ep))
        for contract, ep in self.job_endpoints.items():
            await self.jobs.consume(address_of(contract), ep.spec.options, self._job_runner(ep))

    def _event_handler(self, ep: Endpoint) -> Any:
        async def on_event(data: bytes, headers: Headers | None) -> None:
            try:
                msg, _ = ep.decode(data, headers)
                tp = codec.valid_traceparent(headers.get(H_TRACE)) if headers else None
                await ep.invoke(msg, asyncio.get_running_loop().time() + ep.timeout_s, tp)
            except AiwfeError as e:
                metrics.failed(ep.spec.address, "remote", e.code)
                log.warning("event %s dropped: %s", ep.spec.address, e)

        return on_event

    def _job_runner(self, ep: Endpoint) -> Any:
        rt = reply_type(ep.contract)

        async def run(call: JobCall) -> bytes:
            msg, _ = ep.decode(call.data, call.headers)
            owner = getattr(msg, "owner", None)  # whom the job acts for: its calls queue fairly by it
            ctx = JobContext(self.jobs, call.job_id, call.kind, call.attempt, call.max_deliver)
            token, owner_token = _job.set(ctx), _owner.set(owner_of(owner) if isinstance(owner, str) else None)
            deadline = asyncio.get_running_loop().time() + ep.timeout_s
            tp = codec.valid_traceparent(call.headers.get(H_TRACE))
            try:
                if tracing.STATE.enabled:
                    attrs = {"aiwfe.job_id": call.job_id, "aiwfe.attempt": call.attempt}
                    with tracing.span(f"{ep.spec.address} job", tracing.SpanKind.CONSUMER, tp, attrs):
                        result = await ep.invoke(msg, deadline)
                else:
                    result = await ep.invoke(msg, deadline, tp)
            finally:
                _job.reset(token)
                _owner.reset(owner_token)
            if rt is not None and not isinstance(result, rt):
                raise TypeError(f"{ep.spec.address}: handler returned {type(result).__name__}, expected {rt.__name__}")
            return _enc.encode(result)

        return run

    # -- calling ------------------------------------------------------------------

    def _deadline_for(self, timeout_s: float | None, cap_s: float | None = None) -> float:
        t = self.call_timeout_s if timeout_s is None else timeout_s
        if not math.isfinite(t):
            raise ValueError(f"timeout_s={t!r}: a call's timeout must be a finite number of seconds")
        deadline = asyncio.get_running_loop().time() + (t if cap_s is None or t < cap_s else cap_s)
        inherited = _deadline.get()
        if inherited is not None and inherited < deadline:
            deadline = inherited
        return deadline

    async def call(self, req: Request[R], *, timeout_s: float | None = None, optional: bool = False) -> R:
        """Call a request contract; in-process when served here, over the bus otherwise.

        ``timeout_s`` defaults to the system's ``call_timeout_s``; the handler's own
        ``timeout_s`` caps it, and inside a handler so does the caller's own deadline.
        ``optional``: the caller does without the answer (helios's memory recall), so a call
        that reaches no pod fails at once with ``Unavailable`` instead of waiting for one to
        come (a manifest without that plugin would otherwise pay the wait on every call); for
        ``OPTIONAL_ABSENT_S`` after that, optional calls to the same contract fail so at once
        without asking the server (a pod that starts serving it is used from then on).

        Raises:
            DeadlineExceeded, Unavailable, Overloaded, SchemaMismatch, BadMessage, RemoteError.
            ValueError: ``timeout_s`` is not finite.
        """
        contract = type(req)
        ep = self.endpoints.get(contract)
        deadline = self._deadline_for(timeout_s, ep.timeout_s if ep is not None else None)
        if tracing.STATE.enabled:
            path = "local" if ep is not None else "remote"
            with tracing.span(f"{address_of(contract)} call", tracing.SpanKind.CLIENT, None, {"aiwfe.path": path}):
                if ep is not None:
                    return await ep.invoke(req, deadline)  # type: ignore[no-any-return]
                return await self._call_remote(req, contract, deadline, optional)  # type: ignore[no-any-return]
        if ep is not None:
            t0 = time.perf_counter()
            result = await ep.invoke(req, deadline)
            ep.m_local.observe(time.perf_counter() - t0)
            return result  # type: ignore[no-any-return]
        return await self._call_remote(req, contract, deadline, optional)  # type: ignore[no-any-return]

    async def _call_remote(self, req: Message, contract: type, deadline: float, optional: bool = False) -> Any:
        now = asyncio.get_running_loop().time()
        remaining = deadline - now
        if remaining <= 0:
            raise DeadlineExceeded(f"{address_of(contract)}: deadline passed before the call")
        if optional and self._absent:
            absent = self._absent.get(contract)
            if absent is not None:
                if now < absent[0] + OPTIONAL_ABSENT_S:
                    raise Unavailable(absent[1])
                del self._absent[contract]
        dec = self._reply_decoders.get(contract)
        if dec is None:
            if kind_of(contract) != "request":
                raise TypeError(f"{contract.__qualname__} is a {kind_of(contract)}; use submit() or publish()")
            dec = self._reply_decoders[contract] = msgspec.msgpack.Decoder(reply_type(contract))
            self._schemas[contract] = bytes.fromhex(schema_hash(contract))
        tp = tracing.current_traceparent() if tracing.STATE.enabled else _trace.get()
        job = _job.get()
        body = _enc.encode(req)
        owner = _owner.get()
        payload = pack_call(int(remaining * 1000), self._schemas[contract], tp, body, job.job_id if job else None, owner)
        try:
            data, rh = await self.bus.request(self.subject(contract), payload, None, remaining)
        except (NoResponders, CalleeLost) as e:
            if optional and isinstance(e, NoResponders):
                self._absent[contract] = (asyncio.get_running_loop().time(), str(e))
                raise Unavailable(str(e)) from None
            data, rh = await self._call_again(e, contract, body, tp, job.job_id if job else None, owner, deadline)
        except BusTimeout as e:
            raise DeadlineExceeded(str(e)) from None
        except BusError as e:
            raise Unavailable(str(e)) from None
        if rh is not None:
            err = rh.get(H_ERROR)
            if err is not None:
                raise from_wire(err)
        try:
            return dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(f"{address_of(contract)}: reply does not decode: {e}") from None

    async def _call_again(
        self,
        err: BusError,
        contract: type,
        body: bytes,
        tp: str | None,
        job_id: str | None,
        owner: str | None,
        deadline: float,
    ) -> tuple[bytes, Headers | None]:
        """Send a call again after no responders or a lost callee (module docstring).
        Raises Unavailable (no responders), PeerLost, DeadlineExceeded."""
        loop = asyncio.get_running_loop()
        subject = self.subject(contract)
        again = int(issubclass(contract, Idempotent))
        t0 = loop.time()
        wait_until, delay = t0 + min(NO_RESPONDERS_WAIT_S, (deadline - t0) / 2), 0.025
        while True:
            if isinstance(err, NoResponders) and loop.time() + delay < wait_until:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.4)
            elif isinstance(err, CalleeLost) and again:
                again -= 1
                log.warning("%s; calling again (%s is idempotent)", err, address_of(contract))
                now = loop.time()
                wait_until, delay = now + min(NO_RESPONDERS_WAIT_S, (deadline - now) / 2), 0.025
            elif isinstance(err, CalleeLost):
                why = "after calling again once" if issubclass(contract, Idempotent) else "not called again (not Idempotent)"
                raise PeerLost(f"{err}; {why}") from None
            elif isinstance(err, NoResponders):
                raise Unavailable(f"{err} (waited {loop.time() - t0:.1f} s for one)") from None
            elif isinstance(err, BusTimeout):
                raise DeadlineExceeded(str(err)) from None
            else:
                raise Unavailable(str(err)) from None
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded(f"{address_of(contract)}: deadline passed while calling again ({err})")
            payload = pack_call(int(remaining * 1000), self._schemas[contract], tp, body, job_id, owner)
            try:
                return await self.bus.request(subject, payload, None, remaining)
            except BusError as e:
                err = e

    async def publish(self, event: Event) -> None:
        """Publish an event to every subscriber in every pod (through the bus)."""
        contract = type(event)
        headers = {H_SCHEMA: schema_hash(contract)}
        with self._producer(f"{address_of(contract)} publish", headers, None), _unavailable():
            await self.bus.publish(self.subject(contract), _enc.encode(event), headers)

    @staticmethod
    @contextlib.contextmanager
    def _producer(name: str, headers: Headers, attrs: dict[str, Any] | None) -> Iterator[None]:
        """A PRODUCER span when tracing is on; either way the trace context goes in ``headers``."""
        if tracing.STATE.enabled:
            with tracing.span(name, tracing.SpanKind.PRODUCER, None, attrs):
                headers[H_TRACE] = tracing.current_traceparent() or ""
                yield
            return
        tp = _trace.get()
        if tp:
            headers[H_TRACE] = tp
        yield

    # -- jobs -----------------------------------------------------------------------

    @staticmethod
    def _job_id(address: str, job_id: str | None, idempotency_key: str | None) -> str:
        if job_id is not None:
            return codec.check_job_id(job_id)  # it becomes a subject token and a KV key
        if idempotency_key:
            return uuid.uuid5(uuid.NAMESPACE_URL, f"aiwfe:{address}:{idempotency_key}").hex
        return uuid.uuid4().hex

    async def submit(self, job: Job[Any], *, job_id: str | None = None, idempotency_key: str | None = None) -> str:
        """Durably enqueue a job; return its id.

        ``idempotency_key`` makes the id deterministic (same key → same job, submitted once).

        Raises:
            ValueError (aiwfe.bus.codec.BadField): ``job_id`` is not a job id.
            Unavailable: the bus did not accept the job.
        """
        contract = type(job)
        jid = self._job_id(address_of(contract), job_id, idempotency_key)
        headers = {H_MSG_ID: jid, H_SCHEMA: schema_hash(contract)}
        # a new random id has nothing on record to look up
        await self._submit(address_of(contract), _enc.encode(job), headers, jid, fresh=job_id is None and not idempotency_key)
        return jid

    async def _submit(self, address: str, data: bytes, headers: Headers, job_id: str, *, fresh: bool = False) -> None:
        with self._producer(f"{address} submit", headers, {"aiwfe.job_id": job_id}):
            await self.jobs.submit(address, data, headers, job_id, fresh=fresh)

    async def submit_json(
        self,
        address: str,
        data: bytes,
        *,
        job_id: str | None = None,
        idempotency_key: str | None = None,
        owner: str | None = None,
    ) -> str:
        """Durably enqueue a job given as JSON, validated against its contract first, ``owner``
        recorded before it is queued; see :mod:`aiwfe.kernel.submitting`.

        Raises:
            TooLarge, BadInput (naming the field), Forbidden, Unavailable, DeadlineExceeded,
            ValueError (aiwfe.bus.codec.BadField): ``job_id`` is not a job id.
        """
        return await self.submissions.submit_json(address, data, job_id, idempotency_key, owner)

    async def wait_job(self, job_id: str, *, timeout_s: float = 30.0, poll_s: float = 0.05) -> JobRecord:
        """Wait for a job's record.

        Raises:
            DeadlineExceeded: no record within ``timeout_s``.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while (rec := await self.job_record(job_id)) is None:
            if loop.time() >= end:
                raise DeadlineExceeded(f"job {job_id} not finished after {timeout_s} s")
            await asyncio.sleep(poll_s)
        return rec

    async def cluster_status(self, timeout_s: float = 0.5) -> list[dict[str, Any]]:
        """Every running pod's status (see :func:`aiwfe.kernel.admin.cluster_status`)."""
        from .admin import cluster_status

        return await cluster_status(self.bus, timeout_s)

    def caller_for(self, plugin_name: str, allowed: tuple[type, ...], granted: frozenset[str] = frozenset()) -> Caller:
        """A :class:`Caller` restricted to the contracts a plugin declared in ``calls`` and the
        ``privileges`` it was granted."""
        self.submissions.declare(allowed)
        return Caller(self, plugin_name, frozenset(allowed), granted)


class Caller:
    """A plugin's view of its pod's :class:`Kernel`: ``call``, ``publish`` and ``submit``
    are checked against the contracts the plugin declared in ``calls`` (UndeclaredCall
    otherwise); the job and status methods (``submit_json``, ``job_record``, ``job_owner``,
    ``wait_job``, ``job_events``, ``job_last_seq``, ``cancel_job``, ``cluster_status``) take ids and
    addresses as data and pass through, and so do the kernel attributes the plugin was granted in
    ``privileges`` (see :attr:`aiwfe.kernel.plugin.Plugin.privileges`). Nothing else is visible."""

    __slots__ = ("_allowed", "_granted", "_kernel", "_plugin")
    _PASS_THROUGH = frozenset(
        {"submit_json", "job_record", "job_owner", "wait_job", "job_events", "job_last_seq", "cancel_job", "cluster_status"}
    )
    PRIVILEGES = frozenset({"jobs"})

    def __init__(self, kernel: Kernel, plugin: str, allowed: frozenset[type], granted: frozenset[str] = frozenset()) -> None:
        if unknown := granted - Caller.PRIVILEGES:
            raise ValueError(f"plugin {plugin} asks for unknown privileges {sorted(unknown)}; known: {sorted(Caller.PRIVILEGES)}")
        self._kernel = kernel
        self._plugin = plugin
        self._allowed = allowed
        self._granted = Caller._PASS_THROUGH | granted

    def _check(self, contract: type) -> None:
        if contract not in self._allowed:
            raise UndeclaredCall(
                f"plugin {self._plugin} uses {contract.__qualname__} without declaring it; add it to {self._plugin}'s `calls`"
            )

    async def call(self, req: Request[R], *, timeout_s: float | None = None, optional: bool = False) -> R:
        """See :meth:`Kernel.call`."""
        if type(req) not in self._allowed:
            self._check(type(req))
        return await self._kernel.call(req, timeout_s=timeout_s, optional=optional)

    async def publish(self, event: Event) -> None:
        """See :meth:`Kernel.publish`."""
        self._check(type(event))
        await self._kernel.publish(event)

    async def submit(self, job: Job[Any], *, job_id: str | None = None, idempotency_key: str | None = None) -> str:
        """See :meth:`Kernel.submit`."""
        self._check(type(job))
        return await self._kernel.submit(job, job_id=job_id, idempotency_key=idempotency_key)

    def __getattr__(self, name: str) -> Any:
        if name[0] != "_" and name in self._granted:
            return getattr(self._kernel, name)
        raise AttributeError(f"a plugin's kernel handle has no {name!r} (see aiwfe.kernel.routing.Caller)")
