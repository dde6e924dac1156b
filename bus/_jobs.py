"""The job delivery policy both buses share, so jobs behave the same on either.

One delivery ends in exactly one of: ``ack`` (done, or already done earlier),
``nak`` with a delay (failed, attempts remain), ``term`` (dead-lettered). The outcome
is recorded *before* the ack, and recorded with create-only semantics, so a
redelivery after a crash finds the record and acks: each job's record is written once.

The consumer allows one delivery more than ``max_deliver``: a delivery past the limit
means a worker died during the last attempt, and it is dead-lettered instead of being
silently dropped by the server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import msgspec

from aiwfe.kernel import metrics
from aiwfe.kernel.errors import BadMessage, SchemaMismatch

from .base import JobCall, JobOptions, JobRunner
from .codec import JobRecord

log = logging.getLogger("aiwfe.jobs")

EV_DONE = "job.done"
EV_FAILED = "job.failed"
EV_RETRYING = "job.retrying"
EV_CANCELLED = "job.cancelled"
EV_REPLAYED = "job.replayed"
TERMINAL = (EV_DONE, EV_FAILED, EV_CANCELLED)
_enc = msgspec.msgpack.Encoder()


class Running:
    """The job deliveries running in this process, so that a cancel can reach them."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[Any]] = {}
        self.cancelled: set[str] = set()

    def cancel(self, job_id: str) -> bool:
        """Cancel the delivery of ``job_id`` if it runs here; True when it did."""
        t = self.tasks.get(job_id)
        if t is None or t.done():
            return False
        self.cancelled.add(job_id)
        t.cancel()
        return True


class _Store(Protocol):
    running: Running

    async def job_record(self, job_id: str) -> JobRecord | None: ...
    async def put_record(self, rec: JobRecord) -> bool: ...
    async def emit(self, job_id: str, type: str, data: bytes, msg_id: str | None = None) -> int: ...
    async def dead_letter(self, call: JobCall, reason: dict[str, Any]) -> None: ...


def backoff_for(options: JobOptions, attempt: int) -> float:
    """Delay before attempt ``attempt + 1`` (the last configured value repeats)."""
    if not options.backoff_s:
        return 0.0
    return options.backoff_s[min(attempt - 1, len(options.backoff_s) - 1)]


def _reason(e: BaseException) -> dict[str, Any]:
    return {
        "type": getattr(e, "type", None) or type(e).__name__,
        "message": getattr(e, "message", None) or str(e),
        "retryable": bool(getattr(e, "retryable", False)),
    }


async def process(store: _Store, runner: JobRunner, call: JobCall, options: JobOptions) -> tuple[str, float]:
    """Run one delivery; return ``("ack"|"nak"|"term", nak_delay_s)``.

    Raises:
        Exception: recording the outcome failed (bus down); the caller leaves the job
        unacked so that it is redelivered.
    """
    kind = call.kind
    if call.attempt > 1:
        metrics.REDELIVERIES.labels(kind).inc()
    existing = await store.job_record(call.job_id)
    if existing is not None:
        # An earlier delivery recorded the outcome but may have died before announcing it.
        metrics.JOBS.labels(kind, "duplicate").inc()
        await _announce(store, existing)
        return "ack", 0.0
    if call.attempt > options.max_deliver:
        reason = {"type": "WorkerLost", "message": f"no outcome after {options.max_deliver} attempts", "retryable": False}
        await _fail(store, call, reason)
        return "term", 0.0
    task = asyncio.current_task()
    assert task is not None
    store.running.tasks[call.job_id] = task
    try:
        result = await runner(call)
    except asyncio.CancelledError:
        if call.job_id not in store.running.cancelled:
            raise  # the pod is stopping: the job goes back to the stream
        store.running.cancelled.discard(call.job_id)
        task.uncancel()
        metrics.JOBS.labels(kind, "cancelled").inc()
        return "term", 0.0
    except Exception as e:
        reason = _reason(e)
        final = (
            call.attempt >= options.max_deliver
            or isinstance(e, (BadMessage, SchemaMismatch))
            or (getattr(e, "declared", False) and not getattr(e, "retryable", True))
        )
        if final:
            log.warning("job %s (%s) dead-lettered after %d attempts: %s", call.job_id, kind, call.attempt, reason["message"])
            await _fail(store, call, reason)
            return "term", 0.0
        metrics.JOBS.labels(kind, "retry").inc()
        await store.emit(call.job_id, EV_RETRYING, _enc.encode({"attempt": call.attempt, **reason}))
        return "nak", backoff_for(options, call.attempt)
    finally:
        store.running.tasks.pop(call.job_id, None)
    rec = JobRecord(job_id=call.job_id, kind=kind, status="done", result=result, attempts=call.attempt)
    await _record(store, rec, "done")
    return "ack", 0.0


async def _record(store: _Store, rec: JobRecord, outcome: str) -> bool:
    """Write the outcome once, then announce the one that stands. True when this wrote it."""
    created = await store.put_record(rec)
    if created:
        metrics.JOBS.labels(rec.kind, outcome).inc()
        await _announce(store, rec)
    else:
        metrics.JOBS.labels(rec.kind, "duplicate").inc()
        existing = await store.job_record(rec.job_id)
        if existing is not None:
            await _announce(store, existing)
    return created


async def _announce(store: _Store, rec: JobRecord) -> None:
    """Emit the job's terminal event. Idempotent: the event's message id names the record
    (job, status, finish time), so JetStream drops a second announcement of the same
    record within its duplicate window (a redelivery after a crash between recording and
    announcing), while a replayed job's new record is announced anew."""
    if rec.status == "done":
        typ, data = EV_DONE, rec.result
    else:
        typ = EV_FAILED if rec.status == "failed" else EV_CANCELLED
        data = _enc.encode(rec.error or {})
    await store.emit(rec.job_id, typ, data, msg_id=f"{rec.job_id}.{rec.status}.{rec.finished_at!r}")


async def _fail(store: _Store, call: JobCall, reason: dict[str, Any]) -> None:
    await store.dead_letter(call, reason)
    metrics.DEAD_LETTERS.labels(call.kind).inc()
    rec = JobRecord(job_id=call.job_id, kind=call.kind, status="failed", error=reason, attempts=call.attempt)
    await _record(store, rec, "failed")


async def cancel(store: _Store, job_id: str, reason: str) -> bool:
    """Record ``job_id`` as cancelled (unless it already has an outcome) and emit ``job.cancelled``.

    Returns True when this call recorded the cancellation. Deliveries that start later
    find the record and are acked without running; running ones are cancelled by the
    bus's cancel broadcast (:meth:`Running.cancel`).
    """
    reason_d = {"type": "Cancelled", "message": reason, "retryable": False}
    rec = JobRecord(job_id=job_id, kind="", status="cancelled", error=reason_d, attempts=0)
    if not await store.put_record(rec):
        return False
    await _announce(store, rec)
    return True
