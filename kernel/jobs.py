"""Job semantics, the same on every bus: attempts, backoff, dead-lettering with a reason,
the create-once outcome record, terminal events, in-progress heartbeats, cancellation.

The bus only queues, streams and stores bytes (``aiwfe.bus.base``). One delivery ends in
exactly one of: ``ack`` (done, or done earlier), ``nak`` with a delay (failed, attempts
remain), ``term`` (dead-lettered or cancelled). The outcome is recorded *before* the ack,
create-only, so a redelivery after a crash finds the record and acks: each job's record is
written once. The consumer allows one delivery more than ``max_deliver``: a delivery past
the limit means a worker died during the last attempt, and it is dead-lettered instead of
being silently dropped by the server.

A client sees why a job runs again before it sees the job's progress repeated: the kernel
emits ``job.retrying`` (attempt, reason) before it naks a failed attempt, and a delivery it
did not nak itself (attempt > 1 after a worker crash, an expired ack wait, a pod that
stopped mid-job) emits one with reason ``WorkerLost`` before the handler runs again. Both
name the attempt in their message id, so when the kernel did nak, the stream drops the
second one (within its two-minute duplicate window).

Where things live: records under ``<job_id>`` and owners under ``owner.<job_id>`` in the
bucket; events on ``<prefix>.events.<job_id>``; dead letters on ``<prefix>.dlq.<kind>``
with the reason in ``Aiwfe-Reason``; cancels broadcast on ``<prefix>.control.cancel``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec

from aiwfe.bus.base import Bus, ConsumerOptions, Delivery, Headers
from aiwfe.bus.codec import H_ATTEMPTS, H_JOB_ID, H_MSG_ID, H_REASON, H_TYPE, check_job_id, is_job_id, show
from aiwfe.bus.errors import BusError, NotAccepted, PayloadTooLarge

from . import metrics
from .errors import BadMessage, DeadlineExceeded, SchemaMismatch, TooLarge, Unavailable
from .plugin import HandlerOptions

__all__ = ["TERMINAL", "JobCall", "JobContext", "JobEvent", "JobRecord", "Jobs", "current_job"]

log = logging.getLogger("aiwfe.jobs")

EV_DONE, EV_FAILED, EV_CANCELLED = "job.done", "job.failed", "job.cancelled"
EV_RETRYING, EV_REPLAYED = "job.retrying", "job.replayed"
TERMINAL = (EV_DONE, EV_FAILED, EV_CANCELLED)
RECENT_CANCELS = 65_536  # cancel broadcasts remembered per pod (about 5 MB at most)
_enc = msgspec.msgpack.Encoder()
_rec_dec = msgspec.msgpack.Decoder()


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The one stored outcome of a job (written once, whatever the redeliveries).

    ``status`` is ``done``, ``failed`` or ``cancelled``; ``result`` is the msgpack-encoded
    result Struct of a done job; ``error`` the wire error (``type``, ``message``,
    ``retryable``) of a failed or cancelled one.
    """

    job_id: str
    kind: str
    status: str
    result: bytes = b""
    error: dict[str, Any] | None = None
    attempts: int = 1
    finished_at: float = msgspec.field(default_factory=time.time)

    def decoded(self, type: Any = Any) -> Any:
        """The result decoded (as ``type`` when given, else as plain data); None without one."""
        return msgspec.msgpack.decode(self.result, type=type) if self.result else None


_record_dec = msgspec.msgpack.Decoder(JobRecord)
_tags: dict[type, str] = {}  # event Struct class -> its type tag (emit runs ~45 times per helios job)
_type_headers: dict[str, dict[str, str]] = {}  # event type -> its headers, shared (read-only)


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a job as a reader sees it: stream sequence, type tag, decoded data."""

    seq: int
    job_id: str
    type: str
    data: Any


class JobCall(msgspec.Struct, kw_only=True):
    """One delivery of a job as its runner sees it."""

    job_id: str
    kind: str
    data: bytes
    headers: Headers
    attempt: int
    max_deliver: int
    seq: int = 0  # the message's sequence in the queue (a replayed job has a new one)


#: Runs one job delivery and returns the encoded result; raises to fail the attempt.
JobRunner = Callable[[JobCall], Awaitable[bytes]]

_job: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar("aiwfe_job", default=None)


def current_job() -> JobContext | None:
    """The job being run by the current task, or None outside a job handler."""
    return _job.get()


class JobContext:
    """What a job handler can see of its job: id, attempt, and ``emit`` for progress events.

    A handler serving a call made from inside a job in another pod gets a borrowed context
    (``kind`` empty, ``attempt`` 0): it may add events to that job.
    """

    __slots__ = ("_jobs", "attempt", "job_id", "kind", "max_deliver")

    def __init__(self, jobs: Jobs, job_id: str, kind: str = "", attempt: int = 0, max_deliver: int = 0) -> None:
        self._jobs, self.job_id, self.kind, self.attempt, self.max_deliver = jobs, job_id, kind, attempt, max_deliver

    async def emit(self, event: msgspec.Struct) -> int:
        """Append ``event`` (an Event Struct) to this job's event stream; return its sequence."""
        return await self._jobs.emit(self.job_id, _tag(event), _enc.encode(event))

    async def emit_many(self, events: list[msgspec.Struct]) -> list[int]:
        """Append ``events`` in this order, sent together and confirmed together (one round
        trip, not one each); return their sequences once every one is confirmed."""
        return await self._jobs.emit_many(self.job_id, [(_tag(e), _enc.encode(e)) for e in events])


def _tag(event: msgspec.Struct) -> str:
    if (tag := _tags.get(type(event))) is None:
        tag = _tags[type(event)] = str(type(event).__struct_config__.tag or type(event).__name__)
    return tag


def _headers(type: str) -> Headers:
    """The headers of an event of ``type``: one shared dict per type (the bus does not change it)."""
    if (headers := _type_headers.get(type)) is None:
        headers = {H_TYPE: type}
        if len(_type_headers) < 1024:
            _type_headers[type] = headers
    return headers


def backoff_for(options: HandlerOptions, attempt: int) -> float:
    """Delay before attempt ``attempt + 1`` (the last configured value repeats)."""
    if not options.backoff_s:
        return 0.0
    return options.backoff_s[min(attempt - 1, len(options.backoff_s) - 1)]


def reason_of(e: BaseException) -> dict[str, Any]:
    """The wire form of why an attempt failed."""
    return {
        "type": getattr(e, "type", None) or type(e).__name__,
        "message": getattr(e, "message", None) or str(e),
        "retryable": bool(getattr(e, "retryable", False)),
    }


async def _refuse(problem: str, call: JobCall) -> bytes:
    raise BadMessage(problem)


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except PayloadTooLarge as e:
        raise TooLarge(str(e)) from None
    except BusError as e:
        raise Unavailable(str(e)) from None


class Jobs:
    """The kernel's jobs over one bus: submit, consume, record, announce, cancel, follow."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.prefix = bus.prefix
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelled: set[str] = set()
        # Jobs cancelled recently (broadcasts this pod heard), so that a first delivery of
        # one skips its run without reading the record first: see process().
        self._recent_cancels: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Honour cancel broadcasts (also while draining: jobs still finishing may be cancelled)."""

        async def on_cancel(data: bytes, headers: Headers | None) -> None:
            job_id = data.decode(errors="replace")
            if is_job_id(job_id):
                self._recent_cancels[job_id] = None
                if len(self._recent_cancels) > RECENT_CANCELS:
                    self._recent_cancels.popitem(last=False)
            self._stop_running(job_id)

        await self.bus.subscribe(f"{self.prefix}.control.cancel", on_cancel, until_close=True)

    def stop(self) -> None:
        """Stop the queue watchers."""
        for t in self._watchers:
            t.cancel()
        self._watchers.clear()

    # -- the record, the owner, the events ----------------------------------------

    async def record(self, job_id: str) -> JobRecord | None:
        """The stored outcome of ``job_id``, None while pending or unknown."""
        if not is_job_id(job_id):  # ids become KV keys and subject tokens: no wildcards
            return None
        with _unavailable():
            raw = await self.bus.kv_get(job_id)
        return _record_dec.decode(raw) if raw else None

    async def owner(self, job_id: str) -> str | None:
        """The job's owner, or None for a job never submitted with one."""
        if not is_job_id(job_id):
            return None
        with _unavailable():
            raw = await self.bus.kv_get(f"owner.{job_id}")
        return raw.decode() if raw else None

    async def emit(self, job_id: str, type: str, data: bytes, msg_id: str | None = None) -> int:
        """Append an event to a job's stream; return its sequence (``msg_id``: dedupe)."""
        try:  # as _unavailable(), inline: this runs for every event
            return await self.bus.append(f"{self.prefix}.events.{job_id}", data, _headers(type), msg_id)
        except PayloadTooLarge as e:
            raise TooLarge(str(e)) from None
        except BusError as e:
            raise Unavailable(str(e)) from None

    async def emit_many(self, job_id: str, events: list[tuple[str, bytes]]) -> list[int]:
        """Append ``(type, data)`` events in this order with one round trip (see ``emit``)."""
        with _unavailable():
            return await self.bus.append_many(f"{self.prefix}.events.{job_id}", [(d, _headers(t)) for t, d in events])

    async def last_event_seq(self, job_id: str) -> int:
        """The sequence of the job's last event so far (0 for none): a client resuming after a
        later one claims an event the job does not have."""
        check_job_id(job_id)
        with _unavailable():
            return await self.bus.last_seq(f"{self.prefix}.events.{job_id}")

    async def events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Replay then follow a job's events after ``after_seq``, until its terminal event."""
        check_job_id(job_id)  # raises BadField (ValueError): ids become subject tokens
        async for m in self.bus.follow(f"{self.prefix}.events.{job_id}", after_seq):
            typ = m.headers.get(H_TYPE, "")
            yield JobEvent(seq=m.seq, job_id=job_id, type=typ, data=_rec_dec.decode(m.data) if m.data else None)
            if typ in TERMINAL:
                return

    # -- submitting and cancelling -------------------------------------------------

    async def submit(self, kind: str, data: bytes, headers: Headers, job_id: str, *, fresh: bool = False) -> bool:
        """Durably enqueue; False when ``job_id`` was submitted before (or already finished).

        Raises:
            Unavailable: the bus refused it (nothing was queued; retry with the same id).
            DeadlineExceeded: the bus did not confirm it in time: it may be queued (retry with
                the same id; the stream drops the duplicate).
        """
        # a `fresh` id was just drawn at random: no record can exist, so none is looked up
        if not fresh and await self.record(job_id) is not None:
            return False
        with _unavailable():
            try:
                return await self.bus.enqueue(kind, data, headers, job_id)
            except NotAccepted as e:
                if e.uncertain:  # no answer: the job may be queued (a resubmission with its id is safe)
                    raise DeadlineExceeded(f"{e}; the job may be queued: submit it again with the same id") from None
                raise

    async def cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Record ``job_id`` cancelled (unless it has an outcome), announce it, and stop it in
        whichever pod runs it. True when this call recorded the cancellation."""
        if not is_job_id(job_id):
            return False
        reason_d = {"type": "Cancelled", "message": reason, "retryable": False}
        rec = JobRecord(job_id=job_id, kind="", status="cancelled", error=reason_d, attempts=0)
        created = await self._put(rec)
        if created:
            await self._announce(rec)
        with _unavailable():
            await self.bus.publish(f"{self.prefix}.control.cancel", job_id.encode())
        return created

    def _stop_running(self, job_id: str) -> None:
        t = self._running.get(job_id)
        if t is not None and not t.done():
            self._cancelled.add(job_id)
            t.cancel()

    # -- consuming ------------------------------------------------------------------

    async def consume(self, kind: str, options: HandlerOptions, runner: JobRunner) -> None:
        """Run jobs of ``kind`` with ``runner`` (see the module docstring for the policy)."""
        consumer = ConsumerOptions(
            concurrency=options.concurrency, ack_wait_s=options.ack_wait_s, max_deliver=options.max_deliver + 1
        )

        async def on_delivery(d: Delivery) -> None:
            await self._deliver(kind, options, runner, d)

        await self.bus.consume(kind, consumer, on_delivery)
        self._watchers.append(asyncio.get_running_loop().create_task(metrics.watch_queue(kind, self.bus.queue_stats)))

    async def _deliver(self, kind: str, options: HandlerOptions, runner: JobRunner, d: Delivery) -> None:
        job_id = d.headers.get(H_JOB_ID) or d.headers.get(H_MSG_ID) or f"seq{d.seq}"
        if not is_job_id(job_id):  # it cannot name an event subject or a record: dead-lettered under seq<N>
            runner = functools.partial(_refuse, f"{H_JOB_ID}/{H_MSG_ID}: {show(job_id)} is not a job id")
            job_id = f"seq{d.seq}"
        call = JobCall(
            job_id=job_id, kind=kind, data=d.data, headers=d.headers, attempt=d.attempt, max_deliver=options.max_deliver
        )
        call.seq = d.seq
        hb = asyncio.get_running_loop().create_task(self._heartbeat(d, max(0.2, options.ack_wait_s / 3)))
        try:
            outcome, delay = await self.process(call, options, runner)
        except asyncio.CancelledError:
            raise  # the pod is stopping: unsettled, the delivery is handed back
        except Exception as e:
            log.warning("job %s: outcome not recorded (%r); it will be redelivered", job_id, e)
            return
        finally:
            hb.cancel()
        if outcome == "ack":
            await d.ack()
        elif outcome == "nak":
            await d.nak(delay)
        else:
            await d.term()

    @staticmethod
    async def _heartbeat(d: Delivery, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await d.in_progress()

    async def process(self, call: JobCall, options: HandlerOptions, runner: JobRunner) -> tuple[str, float]:
        """Run one delivery; return ``("ack"|"nak"|"term", nak_delay_s)``.

        Raises:
            Exception: recording the outcome failed (bus down); the delivery is left
            unsettled so that it comes back.
        """
        kind = call.kind
        if call.attempt > 1:
            metrics.REDELIVERIES.labels(kind).inc()
        # A first delivery skips the record read (one JetStream round trip per job, ~15 % of
        # `aiwfe bench jobs`) unless this pod heard the job cancelled: the record is
        # create-once, so a job cancelled while this pod was away still keeps its
        # "cancelled" outcome (_record finds it) and only its run is wasted. Redeliveries
        # read it: an earlier attempt may have recorded the outcome and died before the ack.
        skip_read = call.attempt <= 1 and call.job_id not in self._recent_cancels
        existing = None if skip_read else await self.record(call.job_id)
        if existing is not None:
            # An earlier delivery recorded the outcome but may have died before announcing it.
            metrics.JOBS.labels(kind, "duplicate").inc()
            await self._announce(existing)
            return "ack", 0.0
        if call.attempt > options.max_deliver:
            reason = {"type": "WorkerLost", "message": f"no outcome after {options.max_deliver} attempts", "retryable": False}
            await self._fail(call, reason)
            return "term", 0.0
        if call.attempt > 1:
            why = f"attempt {call.attempt - 1} ended without an outcome (its worker stopped or lost its connection)"
            await self._retrying(call, call.attempt - 1, {"type": "WorkerLost", "message": why, "retryable": True})
        task = asyncio.current_task()
        assert task is not None
        self._running[call.job_id] = task
        try:
            result = await runner(call)
        except asyncio.CancelledError:
            if call.job_id not in self._cancelled:
                raise  # the pod is stopping: the job goes back to the queue
            task.uncancel()
            metrics.JOBS.labels(kind, "cancelled").inc()
            return "term", 0.0
        except Exception as e:
            reason = reason_of(e)
            final = (
                call.attempt >= options.max_deliver
                or isinstance(e, (BadMessage, SchemaMismatch))
                or (getattr(e, "declared", False) and not getattr(e, "retryable", True))
            )
            if final:
                log.warning("job %s (%s) dead-lettered after %d attempts: %s", call.job_id, kind, call.attempt, reason["message"])
                await self._fail(call, reason)
                return "term", 0.0
            metrics.JOBS.labels(kind, "retry").inc()
            await self._retrying(call, call.attempt, reason)
            return "nak", backoff_for(options, call.attempt)
        finally:
            self._running.pop(call.job_id, None)
            self._cancelled.discard(call.job_id)  # also when the handler swallowed its cancellation
        await self._record(JobRecord(job_id=call.job_id, kind=kind, status="done", result=result, attempts=call.attempt))
        return "ack", 0.0

    async def _retrying(self, call: JobCall, attempt: int, reason: dict[str, Any]) -> None:
        """Announce that ``attempt`` failed and the job runs again (once per attempt: see the module docstring)."""
        msg_id = f"{call.job_id}.retrying.{call.seq}.{attempt}"
        await self.emit(call.job_id, EV_RETRYING, _enc.encode({"attempt": attempt, **reason}), msg_id=msg_id)

    async def _put(self, rec: JobRecord) -> bool:
        with _unavailable():
            return await self.bus.kv_create(rec.job_id, _enc.encode(rec))

    async def _record(self, rec: JobRecord) -> None:
        """Write the outcome once, then announce the one that stands."""
        if await self._put(rec):
            metrics.JOBS.labels(rec.kind, rec.status).inc()
            await self._announce(rec)
            return
        metrics.JOBS.labels(rec.kind, "duplicate").inc()
        existing = await self.record(rec.job_id)
        if existing is not None:
            await self._announce(existing)

    async def _announce(self, rec: JobRecord) -> None:
        """Emit the job's terminal event. Idempotent: the event's message id names the record
        (job, status, finish time), so a second announcement of the same record within the
        stream's duplicate window is dropped (a redelivery after a crash between recording
        and announcing), while a replayed job's new record is announced anew."""
        if rec.status == "done":
            typ, data = EV_DONE, rec.result
        else:
            typ, data = (EV_FAILED if rec.status == "failed" else EV_CANCELLED), _enc.encode(rec.error or {})
        await self.emit(rec.job_id, typ, data, msg_id=f"{rec.job_id}.{rec.status}.{rec.finished_at!r}")

    async def _fail(self, call: JobCall, reason: dict[str, Any]) -> None:
        headers = {k: v for k, v in call.headers.items() if not k.startswith("Nats-")}
        headers.update({H_JOB_ID: call.job_id, H_REASON: msgspec.json.encode(reason).decode(), H_ATTEMPTS: str(call.attempt)})
        with _unavailable():
            await self.bus.append(f"{self.prefix}.dlq.{call.kind}", call.data, headers, msg_id=f"dlq-{call.job_id}.{call.seq}")
        metrics.DEAD_LETTERS.labels(call.kind).inc()
        await self._record(JobRecord(job_id=call.job_id, kind=call.kind, status="failed", error=reason, attempts=call.attempt))
