"""``<prefix>.status.job``: a job's outcome and events for external clients, as JSON.

Served by every pod (queue group). Request (JSON, or msgpack)::

    {"job_id": "...", "after_seq": 0, "wait_s": 0}

Reply (JSON for a JSON request, msgpack otherwise)::

    {"job_id", "status": "pending"|"done"|"failed"|"cancelled"|"unknown",
     "result", "error", "events": [{"seq", "type", "data"}], "last_seq", "final"}

``events`` are the job's events after ``after_seq`` (their msgpack data as plain JSON
values), at most :data:`MAX_EVENTS` and about :data:`MAX_EVENT_BYTES` per reply; ask again
with ``after_seq = last_seq`` for more. When there is none yet and the job has no outcome,
the request waits up to ``wait_s`` (capped at :data:`MAX_WAIT_S`) for the next one: a
long-poll. ``final`` is true once the outcome is recorded (``result`` or ``error`` set) and
every event up to the terminal one (``job.done``, ``job.failed``, ``job.cancelled``) was
returned. ``unknown``: no trace of the job — also for a job a gateway user owns (those are
read through the gateway, by their owner only). A job queued by a pod's kernel that has no
event yet also reads as ``unknown``; one submitted on ``<prefix>.submit.<kind>`` reads as
``pending`` at once. At most :data:`MAX_POLLS` requests run at once per pod; more are
answered ``Overloaded`` at once. At most :data:`MAX_WAITING` of them wait; past that a
long-poll is answered at once with what there is (as with ``wait_s = 0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal, cast

import msgspec

from aiwfe.bus.base import Headers, StreamMessage
from aiwfe.bus.codec import H_TYPE
from aiwfe.bus.errors import BusError

from ._external import SUBMITTED, error_reply, is_json, reply
from .errors import AiwfeError, BadInput, Overloaded, Unavailable
from .jobs import TERMINAL, Jobs

__all__ = ["MAX_EVENTS", "MAX_POLLS", "MAX_WAIT_S", "JobStatus", "StatusEvent", "StatusReply", "StatusRequest"]

log = logging.getLogger("aiwfe.jobs")

MAX_WAIT_S = 25.0
MAX_EVENTS = 256
MAX_EVENT_BYTES = 256 * 1024
MAX_POLLS = 512
#: Long-polls (``wait_s`` > 0) waiting at once per pod; past it a request is answered at once,
#: as with ``wait_s = 0``, so long-polls cannot take every slot from other clients.
MAX_WAITING = 64
#: Bound on reading events that are already stored.
READ_TIMEOUT_S = 5.0
#: How long to wait for the terminal event of a job whose outcome is recorded.
TERMINAL_WAIT_S = 1.0


class StatusRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A status request. ``job_id``: letters, digits, ``-`` and ``_`` only (it names a subject)."""

    job_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
    after_seq: Annotated[int, msgspec.Meta(ge=0, le=2**53)] = 0
    wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class StatusEvent(msgspec.Struct, frozen=True):
    """One event of a job: stream sequence, type tag (``Aiwfe-Type``), data as plain values."""

    seq: int
    type: str
    data: Any = None


Status = Literal["pending", "done", "failed", "cancelled", "unknown"]


class StatusReply(msgspec.Struct, frozen=True):
    """The answer of ``<prefix>.status.job`` (see the module docstring)."""

    job_id: str
    status: Status
    result: Any = None
    error: dict[str, Any] | None = None
    events: list[StatusEvent] = []
    last_seq: int = 0
    final: bool = False


_json_req = msgspec.json.Decoder(StatusRequest)
_mp_req = msgspec.msgpack.Decoder(StatusRequest)
_data = msgspec.msgpack.Decoder()


def _event(m: StreamMessage) -> StatusEvent:
    try:
        data = _data.decode(m.data) if m.data else None
    except msgspec.DecodeError:
        data = None
    return StatusEvent(seq=m.seq, type=m.headers.get(H_TYPE, ""), data=data)


class JobStatus:
    """Serves ``<prefix>.status.job`` for one pod from its :class:`~aiwfe.kernel.jobs.Jobs`."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self.bus = jobs.bus
        self.polls = 0
        self.waiting = 0

    async def start(self) -> None:
        """Serve the subject (queue group: one pod answers each request)."""
        await self.bus.serve(f"{self.bus.prefix}.status.job", self.handle)

    async def handle(self, data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        """Answer one request; errors (BadInput, Overloaded, Unavailable) in ``Aiwfe-Error``."""
        as_json = is_json(data, headers)
        try:
            try:
                req = (_json_req if as_json else _mp_req).decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                raise BadInput(f"status.job: {e}") from None
            if self.polls >= MAX_POLLS:
                raise Overloaded(f"status.job: {self.polls} requests running; retry later", retry_after_s=1.0)
            waits = req.wait_s > 0
            if waits and self.waiting >= MAX_WAITING:  # no client holds every slot with long-polls
                req, waits = msgspec.structs.replace(req, wait_s=0.0), False
            self.polls += 1
            self.waiting += waits
            try:
                out = await self.status(req)
            finally:
                self.polls -= 1
                self.waiting -= waits
            return self._fit(out, as_json)
        except AiwfeError as e:
            return error_reply(e)
        except BusError as e:
            return error_reply(Unavailable(str(e)))
        except Exception as e:  # never a request without an answer
            log.exception("status.job failed")
            return error_reply(Unavailable(f"status.job: {type(e).__name__}"))

    def _follow(self, subject: str, after: int) -> AsyncGenerator[StreamMessage, None]:
        return cast("AsyncGenerator[StreamMessage, None]", self.bus.follow(subject, after))  # both buses: generators

    def _fit(self, out: StatusReply, as_json: bool) -> tuple[bytes, Headers | None]:
        """The encoded reply, made to fit one message: fewer events first (``final`` false,
        ask again), then an oversized event's data or result replaced by a ``TooLarge`` note."""
        limit = self.bus.max_payload() - 4096
        body, h = reply(out, as_json)
        while len(body) > limit and len(out.events) > 1:
            keep = out.events[: len(out.events) // 2]
            out = msgspec.structs.replace(out, events=keep, last_seq=keep[-1].seq, final=False)
            body, h = reply(out, as_json)
        if len(body) > limit:
            note = {"type": "TooLarge", "message": f"does not fit one reply of {limit} bytes", "retryable": False}
            events = [StatusEvent(seq=e.seq, type=e.type, data=note) for e in out.events]
            big = out.result is not None
            out = msgspec.structs.replace(out, events=events, result=None, error=note if big else out.error)
            body, h = reply(out, as_json)
        return body, h

    async def status(self, req: StatusRequest) -> StatusReply:
        """The job's status and its events after ``req.after_seq`` (see the module docstring)."""
        job_id, after = req.job_id, req.after_seq
        wait_s = min(req.wait_s, MAX_WAIT_S) if math.isfinite(req.wait_s) else MAX_WAIT_S
        owner = await self.jobs.owner(job_id)
        unknown = StatusReply(job_id=job_id, status="unknown", last_seq=after, final=True)
        if owner is not None and owner != SUBMITTED:
            return unknown
        subject = f"{self.bus.prefix}.events.{job_id}"
        rec = await self.jobs.record(job_id)
        last = await self.bus.last_seq(subject)
        if rec is None and owner is None and last == 0:
            return unknown
        if last > after:
            events, more = await self._read(subject, after, last)
        elif rec is None and wait_s > 0:
            events, more = await self._wait(subject, after, wait_s)
        else:
            events, more = [], False
        terminal = bool(events) and events[-1].type in TERMINAL
        if rec is None and terminal:
            rec = await self.jobs.record(job_id)
        if rec is not None and not terminal and not more and wait_s > 0:
            # The outcome is recorded just before its terminal event is appended.
            tail, more = await self._wait(subject, events[-1].seq if events else after, min(wait_s, TERMINAL_WAIT_S))
            events += tail
        seq = events[-1].seq if events else after
        if rec is None:
            return StatusReply(job_id=job_id, status="pending", events=events, last_seq=seq)
        return StatusReply(
            job_id=job_id,
            status=cast(Status, rec.status),  # a JobRecord's status is done, failed or cancelled
            result=rec.decoded() if rec.status == "done" else None,
            error=rec.error,
            events=events,
            last_seq=seq,
            final=not more,
        )

    async def _read(self, subject: str, after: int, upto: int) -> tuple[list[StatusEvent], bool]:
        """Events after ``after`` up to ``upto`` (already stored); (events, more remain)."""
        out: list[StatusEvent] = []
        size = 0
        async with contextlib.aclosing(self._follow(subject, after)) as it:
            try:
                async with asyncio.timeout(READ_TIMEOUT_S):
                    async for m in it:
                        out.append(_event(m))
                        size += len(m.data)
                        if m.seq >= upto or out[-1].type in TERMINAL:
                            return out, False
                        if len(out) >= MAX_EVENTS or size >= MAX_EVENT_BYTES:
                            return out, True
            except TimeoutError:
                if not out:
                    raise Unavailable(f"{subject}: stored events not read within {READ_TIMEOUT_S} s") from None
        return out, True

    async def _wait(self, subject: str, after: int, wait_s: float) -> tuple[list[StatusEvent], bool]:
        """Wait up to ``wait_s`` for an event after ``after``; then read what else is stored."""
        async with contextlib.aclosing(self._follow(subject, after)) as it:
            try:
                async with asyncio.timeout(wait_s):
                    first = _event(await anext(it))
            except (TimeoutError, StopAsyncIteration):
                return [], False
        if first.type in TERMINAL:
            return [first], False
        last = await self.bus.last_seq(subject)
        if last <= first.seq:
            return [first], False
        rest, more = await self._read(subject, first.seq, last)
        return [first, *rest], more
