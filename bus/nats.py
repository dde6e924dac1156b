"""NatsBus: core request/reply for RPC, JetStream for jobs, job events and results.

Choices (after reading nats-py 2.16's defaults):

* ``max_reconnect_attempts=-1``: nats-py gives up after 60 attempts by default; a pod
  never gives up. ``reconnect_time_wait=0.5`` s (default 2 s) so traffic resumes soon
  after the server returns; ``ping_interval=5`` s (default 120 s) so a dead server is
  noticed in seconds, not minutes.
* RPC rides core NATS with a queue group per subject, so replicas share the load.
  Every request is its own task, so a slow handler never blocks the subscription.
* Jobs: one work-queue stream (``<PREFIX>_JOBS``), one durable pull consumer per job
  kind, explicit ack, ``Nats-Msg-Id`` dedupe (2 min window, plus the result record
  for later duplicates), in-progress heartbeats every ``ack_wait_s / 3`` while a
  handler runs, client-side backoff through ``nak(delay)``, and a dead-letter stream
  (``<PREFIX>_DLQ``) whose messages carry the reason.
* nats-py pull fetches can stall across a server restart: every fetch is bounded by
  ``wait_for``, and after an error the pull subscription and the consumer are
  re-created before fetching again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from aiwfe.kernel.errors import DeadlineExceeded, Unavailable

from . import _jobs
from ._client import FastClient
from ._wheel import DeadlineWheel
from .base import EventHandler, Headers, JobCall, JobOptions, JobRunner, RemoteHandler
from .codec import (
    H_ATTEMPTS,
    H_JOB_ID,
    H_MSG_ID,
    H_REASON,
    H_TYPE,
    JobEvent,
    JobRecord,
    decode_record,
    encode_record,
    stream_names,
)

__all__ = ["NatsBus"]

log = logging.getLogger("aiwfe.bus.nats")
_TERMINAL = _jobs.TERMINAL


class NatsBus:
    """A bus over NATS at ``url`` (several servers: comma-separated); subjects under ``prefix``.

    ``replicas``: JetStream replicas of the streams and the results bucket (3 on a
    three-node cluster, so losing a node loses nothing).

    ``connect_timeout_s`` bounds the first connection (None: keep trying forever, what
    a pod does while NATS is not up yet); once connected it reconnects forever.
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
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.event_ttl_s = event_ttl_s
        self.result_ttl_s = result_ttl_s
        self.dlq_ttl_s = dlq_ttl_s
        self.replicas = replicas
        self.names = stream_names(prefix)
        self.nc: FastClient | None = None
        self._wheel = DeadlineWheel()
        self.js: Any = None
        self._kv: Any = None
        self._subs: list[Any] = []
        self._inflight: set[asyncio.Task[Any]] = set()
        self._job_tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[Any]] = []
        self._stopping = False
        self._running_jobs: dict[int, Msg] = {}
        self.running = _jobs.Running()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Connect and create the streams and the results bucket.

        Raises:
            Unavailable: no connection within ``connect_timeout_s``.
        """

        async def on_error(e: Exception) -> None:
            log.debug("nats: %r", e)

        async def on_disconnect() -> None:
            log.warning("nats: disconnected from %s", self.url)

        async def on_reconnect() -> None:
            log.warning("nats: reconnected to %s", self.url)

        nc = FastClient()
        connect = nc.connect(
            [u.strip() for u in self.url.split(",") if u.strip()],
            name=self.name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py sleeps on it; floats work
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        try:
            if self.connect_timeout_s is None:
                await connect
            else:
                await asyncio.wait_for(connect, self.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as e:
            with contextlib.suppress(Exception):
                await nc.close()
            raise Unavailable(f"cannot connect to NATS at {self.url}: {e!r}") from None
        self.nc = nc
        self.js = nc.jetstream()
        await self._ensure_streams()

        async def on_cancel(msg: Msg) -> None:
            self.running.cancel(msg.data.decode(errors="replace"))

        # Not in self._subs: a draining pod still honours cancels for the jobs it finishes.
        await nc.subscribe(f"{self.prefix}.control.cancel", cb=on_cancel)

    async def _ensure_streams(self) -> None:
        n, p = self.names, self.prefix
        configs = [
            api.StreamConfig(
                name=n["jobs"],
                subjects=[f"{p}.jobs.>"],
                retention=api.RetentionPolicy.WORK_QUEUE,
                storage=api.StorageType.FILE,
                duplicate_window=120.0,
                num_replicas=self.replicas,
            ),
            api.StreamConfig(
                name=n["events"],
                subjects=[f"{p}.events.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=self.event_ttl_s,
                num_replicas=self.replicas,
            ),
            api.StreamConfig(
                name=n["dlq"],
                subjects=[f"{p}.dlq.>"],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=self.dlq_ttl_s,
                num_replicas=self.replicas,
            ),
        ]
        for cfg in configs:
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(cfg)
        try:
            self._kv = await self.js.key_value(n["results"])
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self.js.create_key_value(
                bucket=n["results"], history=1, ttl=self.result_ttl_s, storage=api.StorageType.FILE, replicas=self.replicas
            )

    def ready(self) -> str | None:
        """None when connected, else why not."""
        if self.nc is None:
            return "NATS: not connected yet"
        if not self.nc.is_connected:
            return f"NATS: {'reconnecting' if self.nc.is_reconnecting else 'disconnected'} ({self.url})"
        return None

    async def flush(self) -> None:
        """PING/PONG round trip: the server has processed our subscriptions."""
        await self._conn().flush(timeout=5)

    async def stop_taking_work(self) -> None:
        """Unsubscribe request/event handlers and stop fetching jobs."""
        self._stopping = True
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._loops.clear()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight requests and jobs; nak unfinished jobs at the limit.

        Returns True when everything finished in time.
        """
        pending = self._inflight | self._job_tasks
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout_s)
        else:
            still = set()
        if not still:
            return True
        # Jobs left unfinished go back to the stream at once instead of after ack_wait.
        for m in list(self._running_jobs.values()):
            with contextlib.suppress(Exception):
                await m.nak()
        self._running_jobs.clear()
        for t in still:
            t.cancel()
        await asyncio.gather(*still, return_exceptions=True)
        return False

    async def close(self) -> None:
        """Flush and close the connection."""
        await self.stop_taking_work()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self.nc.close()

    # -- RPC and events ----------------------------------------------------------

    def _conn(self) -> FastClient:
        if self.nc is None or self.nc.is_closed:
            raise Unavailable("NATS connection is closed")
        return self.nc

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Core NATS request. Raises DeadlineExceeded or Unavailable."""
        nc = self._conn()
        try:
            if headers is None:
                msg = await nc.call(subject, data, timeout_s, self._wheel)
            else:
                msg = await nc.request(subject, data, timeout=timeout_s, headers=headers)
        except nats.errors.NoRespondersError:
            raise Unavailable(f"no pod serves {subject}") from None
        except nats.errors.TimeoutError:
            raise DeadlineExceeded(f"{subject}: no reply within {timeout_s * 1000:.0f} ms") from None
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError) as e:
            raise Unavailable(f"{subject}: NATS connection unusable ({e!r})") from None
        return msg.data, msg.headers

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Core NATS publish."""
        await self._conn().publish(subject, data, headers=headers)

    async def serve(self, subject: str, handler: RemoteHandler) -> None:
        """Queue-subscribe ``subject``; each request runs in its own task."""
        nc = self._conn()
        loop = asyncio.get_running_loop()
        inflight = self._inflight
        current_task = asyncio.current_task

        async def respond(msg: Msg) -> None:
            # The task removes itself: a done-callback would cost one more loop turn per request.
            try:
                data, headers = await handler(msg.data, msg.headers)
                if msg.reply:
                    try:
                        await nc.publish(msg.reply, data, headers=headers)
                    except Exception as e:
                        log.warning("reply on %s lost: %r", subject, e)
            finally:
                inflight.discard(current_task())  # type: ignore[arg-type]

        async def on_msg(msg: Msg) -> None:
            inflight.add(loop.create_task(respond(msg)))

        self._subs.append(await nc.subscribe(subject, queue=subject, cb=on_msg))

    async def subscribe(self, subject: str, handler: EventHandler) -> None:
        """Subscribe ``subject`` without a queue group (every pod gets every event)."""
        nc = self._conn()
        loop = asyncio.get_running_loop()
        inflight = self._inflight

        async def on_msg(msg: Msg) -> None:
            t: asyncio.Task[None] = loop.create_task(handler(msg.data, msg.headers))  # type: ignore[arg-type]
            inflight.add(t)
            t.add_done_callback(inflight.discard)

        self._subs.append(await nc.subscribe(subject, cb=on_msg))

    # -- jobs --------------------------------------------------------------------

    def job_subject(self, kind: str) -> str:
        """``<prefix>.jobs.<kind>``."""
        return f"{self.prefix}.jobs.{kind}"

    async def submit(self, kind: str, data: bytes, headers: Headers, job_id: str) -> bool:
        """Publish a job to JetStream and wait for the stream's ack.

        Returns False when the id was already submitted (dedupe window or finished job).

        Raises:
            Unavailable: JetStream did not acknowledge (the caller may retry with the same id).
        """
        if await self.job_record(job_id) is not None:
            return False
        headers = {**headers, H_MSG_ID: job_id}
        try:
            ack = await self.js.publish(self.job_subject(kind), data, headers=headers, timeout=5.0)
        except (TimeoutError, nats.errors.Error) as e:
            raise Unavailable(f"job {job_id} not accepted by JetStream: {e!r}") from None
        return not ack.duplicate

    def _consumer_config(self, kind: str, options: JobOptions) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name="jobs_" + kind.replace(".", "_"),
            filter_subject=self.job_subject(kind),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=options.ack_wait_s,
            # One delivery beyond max_deliver lets a worker dead-letter a job whose
            # previous worker died during the last attempt (see bus._jobs).
            max_deliver=options.max_deliver + 1,
            max_ack_pending=max(1000, options.concurrency * 4),
        )

    async def consume(self, kind: str, options: JobOptions, runner: JobRunner) -> None:
        """Create the durable consumer of ``kind`` and start fetching."""
        cfg = self._consumer_config(kind, options)
        await self._ensure_consumer(cfg)
        loop = asyncio.get_running_loop()
        self._loops.append(loop.create_task(self._fetch_loop(kind, cfg, options, runner)))
        self._loops.append(loop.create_task(self._watch_queue(kind, cfg)))

    async def _watch_queue(self, kind: str, cfg: api.ConsumerConfig, every_s: float = 5.0) -> None:
        """Export the queue depth and the oldest job's age of ``kind`` every ``every_s``."""
        from aiwfe.kernel.metrics import QUEUE_DEPTH, QUEUE_OLDEST

        subject = self.job_subject(kind)
        while True:
            try:
                info = await self.js.consumer_info(self.names["jobs"], cfg.durable_name)
                depth = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
                QUEUE_DEPTH.labels(kind).set(depth)
                age = 0.0
                if depth:
                    first = await self.js.get_msg(self.names["jobs"], seq=1, subject=subject, next=True)
                    if first.time is not None:
                        age = max(0.0, time.time() - first.time.timestamp())
                QUEUE_OLDEST.labels(kind).set(age)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the next round tries again; the gauges keep their last value
                log.debug("queue watch of %s: %r", kind, e)
            await asyncio.sleep(every_s)

    async def _ensure_consumer(self, cfg: api.ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(self.names["jobs"], cfg)
        except nats.js.errors.BadRequestError:
            await self.js.delete_consumer(self.names["jobs"], cfg.durable_name)
            await self.js.add_consumer(self.names["jobs"], cfg)

    async def _fetch_loop(self, kind: str, cfg: api.ConsumerConfig, options: JobOptions, runner: JobRunner) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(options.concurrency)
        psub: Any = None
        failures = 0
        while not self._stopping:
            await slots.acquire()
            free = 1
            while free < 64 and not slots.locked():
                await slots.acquire()
                free += 1
            try:
                if psub is None:
                    psub = await self.js.pull_subscribe_bind(durable=cfg.durable_name, stream=self.names["jobs"])
                # wait_for guards against fetches that never return after a server restart.
                msgs = await asyncio.wait_for(psub.fetch(batch=free, timeout=1.0), timeout=6.0)
                failures = 0
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            except asyncio.CancelledError:
                for _ in range(free):
                    slots.release()
                raise
            except Exception as e:
                msgs = []
                failures += 1
                log.warning("fetch %s failed (%r); re-creating the pull subscription", kind, e)
                with contextlib.suppress(Exception):
                    if psub is not None:
                        await psub.unsubscribe()
                psub = None
                await asyncio.sleep(min(0.2 * failures, 2.0))
                if self.nc is not None and self.nc.is_connected:
                    with contextlib.suppress(Exception):
                        await self._ensure_consumer(cfg)
            for _ in range(free - len(msgs)):
                slots.release()
            for m in msgs:
                t = loop.create_task(self._deliver(kind, m, options, runner, slots))
                self._job_tasks.add(t)
                t.add_done_callback(self._job_tasks.discard)
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _deliver(self, kind: str, m: Msg, options: JobOptions, runner: JobRunner, slots: asyncio.Semaphore) -> None:
        key = id(m)
        self._running_jobs[key] = m
        hb = asyncio.get_running_loop().create_task(self._heartbeat(m, max(0.2, options.ack_wait_s / 3)))
        try:
            meta = m.metadata
            headers = dict(m.headers or {})
            job_id = headers.get(H_JOB_ID) or headers.get(H_MSG_ID) or f"seq{meta.sequence.stream}"
            call = JobCall(
                job_id=job_id,
                kind=kind,
                data=m.data,
                headers=headers,
                attempt=meta.num_delivered,
                max_deliver=options.max_deliver,
            )
            try:
                outcome, delay = await _jobs.process(self, runner, call, options)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # The outcome could not be recorded (NATS down): leave it unacked; it comes back.
                log.warning("job %s: outcome not recorded (%r); it will be redelivered", job_id, e)
                return
            if outcome == "ack":
                await m.ack()
            elif outcome == "nak":
                await m.nak(delay=delay)
            else:
                await m.term()
        except Exception as e:
            log.warning("job delivery on %s: %r", kind, e)
        finally:
            hb.cancel()
            self._running_jobs.pop(key, None)
            slots.release()

    async def _heartbeat(self, m: Msg, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await m.in_progress()

    async def put_record(self, rec: JobRecord) -> bool:
        """Store a job's outcome once. Returns False when one was already stored."""
        try:
            await self._kv.create(rec.job_id, encode_record(rec))
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False

    async def claim_job(self, job_id: str, owner: str) -> str:
        """Record the job's owner once (key ``owner.<job_id>`` in the results bucket)."""
        try:
            await self._kv.create(f"owner.{job_id}", owner.encode())
            return owner
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self.job_owner(job_id) or owner

    async def job_owner(self, job_id: str) -> str | None:
        """The owner recorded for ``job_id``, or None."""
        try:
            entry = await self._kv.get(f"owner.{job_id}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError):
            return None
        return entry.value.decode() if entry.value else None

    async def job_record(self, job_id: str) -> JobRecord | None:
        """The stored outcome of ``job_id``, or None."""
        try:
            entry = await self._kv.get(job_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except nats.js.errors.InvalidKeyError:
            return None
        return decode_record(entry.value) if entry.value else None

    async def dead_letter(self, call: JobCall, reason: dict[str, Any]) -> None:
        """Publish a job to ``<prefix>.dlq.<kind>`` with the reason in its headers."""
        headers = {k: v for k, v in call.headers.items() if not k.startswith("Nats-")}
        headers[H_MSG_ID] = f"dlq-{call.job_id}"
        headers[H_JOB_ID] = call.job_id
        headers[H_REASON] = msgspec.json.encode(reason).decode()
        headers[H_ATTEMPTS] = str(call.attempt)
        await self.js.publish(f"{self.prefix}.dlq.{call.kind}", call.data, headers=headers, timeout=5.0)

    async def _read_dlq(self, kind: str | None) -> list[tuple[str, int, bytes, Headers]]:
        subject = f"{self.prefix}.dlq.{kind or '>'}"
        out: list[tuple[str, int, bytes, Headers]] = []
        info = await self.js.stream_info(self.names["dlq"])
        if info.state.messages == 0:
            return out
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    break
                out.append((m.subject, m.metadata.sequence.stream, m.data, dict(m.headers or {})))
                if m.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out

    async def dead_letters(self, kind: str | None = None) -> list[tuple[bytes, Headers]]:
        """Read the dead-letter stream (all kinds, or one)."""
        return [(data, headers) for _, _, data, headers in await self._read_dlq(kind)]

    async def replay_dead_letters(self, kind: str | None = None, job_id: str | None = None) -> list[str]:
        """Re-queue dead-lettered jobs (all, one kind, or one job) under their own job ids.

        The failed record is removed first so the job runs again; the replay gets a fresh
        ``Nats-Msg-Id`` (the dedupe window would drop the old one) and a ``job.replayed``
        event; the dead letter is deleted once re-queued. Returns the replayed job ids.
        """
        done: list[str] = []
        dlq_prefix = f"{self.prefix}.dlq."
        for subject, seq, data, headers in await self._read_dlq(kind):
            jid = headers.get(H_JOB_ID, "")
            if not jid or (job_id is not None and jid != job_id):
                continue
            job_kind = subject[len(dlq_prefix) :]
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await self._kv.delete(jid)
            fresh = {k: v for k, v in headers.items() if k not in (H_REASON, H_ATTEMPTS, H_MSG_ID)}
            fresh[H_MSG_ID] = f"{jid}.replay{seq}"
            await self.js.publish(self.job_subject(job_kind), data, headers=fresh, timeout=5.0)
            await self.emit(jid, _jobs.EV_REPLAYED, msgspec.msgpack.encode({"from_dead_letter": seq}))
            await self.js.delete_msg(self.names["dlq"], seq)
            done.append(jid)
        return done

    async def answer(self, subject: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Reply to every request on ``subject`` with ``provider()`` as JSON (all pods answer)."""
        nc = self._conn()

        async def on_msg(msg: Msg) -> None:
            if msg.reply:
                await nc.publish(msg.reply, msgspec.json.encode(provider()))

        self._subs.append(await nc.subscribe(subject, cb=on_msg))

    async def gather(self, subject: str, timeout_s: float) -> list[dict[str, Any]]:
        """One request, every answer that arrives within ``timeout_s``."""
        nc = self._conn()
        inbox = nc.new_inbox()
        out: list[dict[str, Any]] = []

        async def on_msg(msg: Msg) -> None:
            with contextlib.suppress(msgspec.DecodeError):
                out.append(msgspec.json.decode(msg.data))

        sub = await nc.subscribe(inbox, cb=on_msg)
        try:
            await nc.publish(subject, b"", reply=inbox)
            await asyncio.sleep(timeout_s)
        finally:
            await sub.unsubscribe()
        return out

    async def cancel_job(self, job_id: str, reason: str) -> bool:
        """Record the cancellation once, then tell every pod to stop the job if it runs it."""
        created = await _jobs.cancel(self, job_id, reason)
        await self._conn().publish(f"{self.prefix}.control.cancel", job_id.encode())
        return created

    # -- job events --------------------------------------------------------------

    async def emit(self, job_id: str, type: str, data: bytes, msg_id: str | None = None) -> int:
        """Append to ``<prefix>.events.<job_id>``; return the stream sequence.

        With ``msg_id`` a repeat within the stream's duplicate window is dropped (and the
        first one's sequence returned).
        """
        headers = {H_TYPE: type}
        if msg_id:
            headers[H_MSG_ID] = msg_id
        ack = await self.js.publish(f"{self.prefix}.events.{job_id}", data, headers=headers, timeout=5.0)
        return int(ack.seq)

    async def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Replay a job's events after ``after_seq`` and follow them until done or failed."""
        subject = f"{self.prefix}.events.{job_id}"
        if after_seq > 0:
            sub = await self.js.subscribe(
                subject,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                config=api.ConsumerConfig(opt_start_seq=after_seq + 1),
            )
        else:
            sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=3600)
                except nats.errors.TimeoutError:
                    continue
                seq = m.metadata.sequence.stream
                if seq <= after_seq:
                    continue
                typ = (m.headers or {}).get(H_TYPE, "")
                data = msgspec.msgpack.decode(m.data) if m.data else None
                yield JobEvent(seq=seq, job_id=job_id, type=typ, data=data)
                if typ in _TERMINAL:
                    return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
