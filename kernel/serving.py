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
import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator
from typing import Any

import msgspec

from aiwfe.bus.base import Headers
from aiwfe.bus.codec import H_ERROR, BadField, owner_key, read_headers, unpack_call
from aiwfe.bus.wheel import DeadlineWheel

from . import metrics, tracing
from .contract import schema_hash
from .errors import AiwfeError, BadMessage, DeadlineExceeded, RemoteError, SchemaMismatch, TooLarge, as_remote, to_wire
from .jobs import JobContext, Jobs, _job
from .limiter import Limiter
from .plugin import HandlerSpec, Plugin

__all__ = ["Endpoint", "acting_for", "current_deadline", "current_owner"]

log = logging.getLogger("aiwfe.kernel")

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("aiwfe_deadline", default=None)
_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("aiwfe_traceparent", default=None)
#: Whom the current work acts for: the key of fair queueing (:class:`Limiter`). Set from a
#: job's ``owner`` by the job runner, from the call preamble by the serving side, by
#: :func:`acting_for` (the gateway, for its users' direct calls); calls made under it carry it.
_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("aiwfe_owner", default=None)
_enc = msgspec.msgpack.Encoder()
_json_enc = msgspec.json.Encoder()


def current_deadline() -> float | None:
    """The running handler's deadline (``loop.time()`` seconds), or None outside one."""
    return _deadline.get()


def current_owner() -> str | None:
    """Whom the current work acts for, as the key of fair queueing (the owner itself when it
    is 1–128 printable ASCII, else a stable digest: :func:`aiwfe.bus.codec.owner_key`), or None."""
    return _owner.get()


def owner_of(owner: str | None) -> str | None:
    """``owner`` as :func:`current_owner` gives it (the same key in every pod)."""
    return owner_key(owner).decode() if owner else None


@contextlib.contextmanager
def acting_for(owner: str | None) -> Iterator[None]:
    """Calls made inside act for ``owner``: every handler queue they reach takes them in that
    owner's turn (:class:`Limiter`). Inside a job, its owner applies without this."""
    token = _owner.set(owner_of(owner))
    try:
        yield
    finally:
        _owner.reset(token)


class Endpoint:
    """One contract served in this pod: decoding, limits, deadline, error mapping."""

    # fmt: off
    __slots__ = ("__weakref__", "contract", "decoder", "fn", "jobs", "json_decoder", "limiter", "m_local", "m_remote",
                 "max_reply", "overdue", "schema", "schema_raw", "spec", "timeout_s", "wheel")
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
        self.max_reply = 1 << 62  # the bus's max_payload, set when the kernel serves it on a bus
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
        before = task.cancelling()
        # Ordering rule: arm the deadline before taking a slot (so it bounds the wait in the
        # queue), and take the slot inside the try whose finally releases it.
        timer = self.wheel.add(deadline, task, self.overdue)
        token = _deadline.set(deadline)
        key = _owner.get()
        entered = False
        try:
            await lim.enter(key)
            entered = True
            return await self.fn(msg)
        except asyncio.CancelledError:
            # The wheel's cancellation is taken back; one that came with it (a stop) goes on.
            if timer[1].expired and task.uncancel() == before:
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
        trace_token = job_token = owner_token = None
        deadline_ms: float | None
        try:
            pre = unpack_call(data)
            if pre is not None:
                deadline_ms, schema, tp, job_id, owner, body = pre
                if schema != self.schema_raw:
                    raise self._mismatch(schema.hex())
                msg, json = self._decode(self.decoder, body), False
                if job_id and self.jobs is not None:
                    job_token = _job.set(JobContext(self.jobs, job_id))
            else:
                deadline_ms, tp, _, _ = read_headers(headers)
                msg, json = self.decode(data, headers)
                owner = None  # an external publisher's request acts for nobody
            owner_token = _owner.set(owner)  # never the serving task's own
            remaining_s = self.timeout_s if deadline_ms is None or deadline_ms >= self.timeout_s * 1e3 else deadline_ms / 1e3
            if tp:
                trace_token = _trace.set(tp)
            reply = await self.invoke(msg, asyncio.get_running_loop().time() + remaining_s, tp)
            self.m_remote.observe(time.perf_counter() - t0)
            out = _json_enc.encode(reply) if json else _enc.encode(reply)
            if len(out) > self.max_reply:  # NATS would refuse it and the caller would hear nothing
                raise TooLarge(f"{self.spec.address}: a reply of {len(out)} bytes, over the bus's max_payload {self.max_reply}")
            return out, None
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
            if owner_token is not None:
                _owner.reset(owner_token)
