"""LocalBus: the bus in-process, with NatsBus's semantics, for unit tests and single-pod runs.

Several kernels may share one LocalBus (that is how unit tests build multi-pod
placements without NATS). Requests are routed round-robin among the kernels serving a
subject; events reach every subscriber; jobs are queued, deduplicated by id, retried
with the configured backoff, dead-lettered after ``max_deliver`` attempts, and their
outcome is recorded once -- the same policy code as NatsBus (``bus._jobs``).
Nothing survives the process: use NatsBus where durability matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from aiwfe.kernel.errors import DeadlineExceeded, Unavailable

from . import _jobs
from .base import EventHandler, Headers, JobCall, JobOptions, JobRunner, RemoteHandler
from .codec import H_ATTEMPTS, H_JOB_ID, H_MSG_ID, H_REASON, JobEvent, JobRecord

__all__ = ["LocalBus"]

_TERMINAL = _jobs.TERMINAL


class LocalBus:
    """An in-process bus under ``prefix``."""

    def __init__(self, prefix: str = "aiwfe") -> None:
        self.prefix = prefix
        self._serve: dict[str, list[RemoteHandler]] = {}
        self._rr: dict[str, itertools.count[int]] = {}
        self._subs: dict[str, list[EventHandler]] = {}
        self._queues: dict[str, asyncio.Queue[tuple[str, bytes, Headers, int]]] = {}
        self._submitted: set[str] = set()
        self._records: dict[str, JobRecord] = {}
        self._owners: dict[str, str] = {}
        self._event_ids: dict[str, int] = {}
        self._events: dict[str, list[JobEvent]] = {}
        self._event_cond = asyncio.Condition()
        self._seq = itertools.count(1)
        self._dlq: list[tuple[str, bytes, Headers]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._workers: list[asyncio.Task[Any]] = []
        self._mine: list[tuple[dict[str, list[Any]], str, Any]] = []
        self._stopping = False
        self.running = _jobs.Running()
        self._answers: dict[str, list[Callable[[], dict[str, Any]]]] = {}

    async def start(self) -> None:
        """Nothing to connect."""

    def ready(self) -> str | None:
        """Always ready."""
        return None

    async def flush(self) -> None:
        """Nothing is buffered."""

    async def stop_taking_work(self) -> None:
        """Stop job workers; unregister handlers."""
        self._stopping = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        for table, subject, h in self._mine:
            with contextlib.suppress(ValueError):
                table[subject].remove(h)
        self._mine.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight events and jobs."""
        if not self._tasks:
            return True
        _, still = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for t in still:
            t.cancel()
        return not still

    async def close(self) -> None:
        """Stop everything."""
        await self.stop_taking_work()

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Call a handler registered for ``subject`` (round-robin)."""
        handlers = self._serve.get(subject)
        if not handlers:
            raise Unavailable(f"no pod serves {subject}")
        h = handlers[next(self._rr[subject]) % len(handlers)]
        try:
            async with asyncio.timeout(timeout_s):
                return await h(data, dict(headers) if headers else None)
        except TimeoutError:
            raise DeadlineExceeded(f"{subject}: no reply within {timeout_s * 1000:.0f} ms") from None

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Deliver to every subscriber (each in its own task)."""
        for h in list(self._subs.get(subject, ())):
            self._spawn(h(data, dict(headers or {})))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def serve(self, subject: str, handler: RemoteHandler) -> None:
        """Register a request handler."""
        self._serve.setdefault(subject, []).append(handler)
        self._rr.setdefault(subject, itertools.count())
        self._mine.append((self._serve, subject, handler))

    async def subscribe(self, subject: str, handler: EventHandler) -> None:
        """Register an event handler."""
        self._subs.setdefault(subject, []).append(handler)
        self._mine.append((self._subs, subject, handler))

    def _queue(self, kind: str) -> asyncio.Queue[tuple[str, bytes, Headers, int]]:
        q = self._queues.get(kind)
        if q is None:
            q = self._queues[kind] = asyncio.Queue()
        return q

    async def submit(self, kind: str, data: bytes, headers: Headers, job_id: str) -> bool:
        """Enqueue a job unless its id was seen before."""
        if job_id in self._submitted:
            return False
        self._submitted.add(job_id)
        self._queue(kind).put_nowait((job_id, data, {**headers, H_MSG_ID: job_id}, 1))
        return True

    async def consume(self, kind: str, options: JobOptions, runner: JobRunner) -> None:
        """Start ``options.concurrency`` workers for ``kind``."""
        self._stopping = False
        q = self._queue(kind)
        for _ in range(options.concurrency):
            self._workers.append(asyncio.get_running_loop().create_task(self._worker(kind, q, options, runner)))

    async def _worker(
        self, kind: str, q: asyncio.Queue[tuple[str, bytes, Headers, int]], options: JobOptions, runner: JobRunner
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job_id, data, headers, attempt = await q.get()
            call = JobCall(job_id=job_id, kind=kind, data=data, headers=headers, attempt=attempt, max_deliver=options.max_deliver)
            task = self._spawn(_jobs.process(self, runner, call, options))
            try:
                outcome, delay = await asyncio.shield(task)
            except asyncio.CancelledError:
                # Stopping: the delivery is abandoned and goes back to the queue, as an unacked
                # JetStream message would.
                q.put_nowait((job_id, data, headers, attempt + 1))
                raise
            if outcome == "nak":
                loop.call_later(delay, q.put_nowait, (job_id, data, headers, attempt + 1))

    async def put_record(self, rec: JobRecord) -> bool:
        """Store an outcome once."""
        if rec.job_id in self._records:
            return False
        self._records[rec.job_id] = rec
        return True

    async def claim_job(self, job_id: str, owner: str) -> str:
        """Record the job's owner once."""
        return self._owners.setdefault(job_id, owner)

    async def job_owner(self, job_id: str) -> str | None:
        """The owner recorded for ``job_id``, or None."""
        return self._owners.get(job_id)

    async def job_record(self, job_id: str) -> JobRecord | None:
        """The stored outcome, or None."""
        return self._records.get(job_id)

    async def answer(self, subject: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Register a status provider for ``subject``."""
        self._answers.setdefault(subject, []).append(provider)
        self._mine.append((self._answers, subject, provider))

    async def gather(self, subject: str, timeout_s: float) -> list[dict[str, Any]]:
        """Every registered provider's answer."""
        return [msgspec.json.decode(msgspec.json.encode(p())) for p in list(self._answers.get(subject, ()))]

    async def cancel_job(self, job_id: str, reason: str) -> bool:
        """Record the cancellation once and stop the job if it runs."""
        created = await _jobs.cancel(self, job_id, reason)
        self.running.cancel(job_id)
        return created

    async def dead_letter(self, call: JobCall, reason: dict[str, Any]) -> None:
        """Keep a dead letter with its reason."""
        headers = dict(call.headers)
        headers[H_JOB_ID] = call.job_id
        headers[H_REASON] = msgspec.json.encode(reason).decode()
        headers[H_ATTEMPTS] = str(call.attempt)
        self._dlq.append((call.kind, call.data, headers))

    async def dead_letters(self, kind: str | None = None) -> list[tuple[bytes, Headers]]:
        """The dead letters (all kinds, or one)."""
        return [(d, h) for k, d, h in self._dlq if kind is None or k == kind]

    async def replay_dead_letters(self, kind: str | None = None, job_id: str | None = None) -> list[str]:
        """Re-queue dead-lettered jobs under their own ids (see NatsBus.replay_dead_letters)."""
        done, keep = [], []
        for k, d, h in self._dlq:
            jid = h.get(H_JOB_ID, "")
            if (kind is not None and k != kind) or (job_id is not None and jid != job_id) or not jid:
                keep.append((k, d, h))
                continue
            self._records.pop(jid, None)
            fresh = {key: v for key, v in h.items() if key not in (H_REASON, H_ATTEMPTS)}
            self._queue(k).put_nowait((jid, d, fresh, 1))
            await self.emit(jid, _jobs.EV_REPLAYED, msgspec.msgpack.encode({"from_dead_letter": True}))
            done.append(jid)
        self._dlq = keep
        return done

    async def emit(self, job_id: str, type: str, data: bytes, msg_id: str | None = None) -> int:
        """Append a job event (a repeated ``msg_id`` is dropped, as JetStream does)."""
        if msg_id is not None:
            if msg_id in self._event_ids:
                return self._event_ids[msg_id]
        seq = next(self._seq)
        if msg_id is not None:
            self._event_ids[msg_id] = seq
        ev = JobEvent(seq=seq, job_id=job_id, type=type, data=msgspec.msgpack.decode(data) if data else None)
        self._events.setdefault(job_id, []).append(ev)
        async with self._event_cond:
            self._event_cond.notify_all()
        return seq

    def _has_after(self, job_id: str, seq: int) -> bool:
        return any(e.seq > seq for e in self._events.get(job_id, ()))

    async def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Replay then follow a job's events until done or failed."""
        last = after_seq
        while True:
            for ev in list(self._events.get(job_id, ())):
                if ev.seq > last:
                    last = ev.seq
                    yield ev
                    if ev.type in _TERMINAL:
                        return
            async with self._event_cond:
                await self._event_cond.wait_for(functools.partial(self._has_after, job_id, last))
