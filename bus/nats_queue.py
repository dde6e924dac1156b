"""NatsBus's work queue: one work-queue stream (``<PREFIX>_JOBS``, subjects
``<prefix>.jobs.<kind>``), one durable pull consumer per kind shared by every replica,
explicit acks, ``Nats-Msg-Id`` dedupe within a 2-minute window.

The stream's subjects are the kinds the pods accept, not ``<prefix>.jobs.>``: each pod adds
its kinds when it starts (:meth:`QueueMixin.accept_kinds`, created with the first one). A
publish to any other kind finds no stream and gets no JetStream ack, so nothing is kept
that no consumer will take. JetStream has no compare-and-set for a stream's configuration:
two pods adding kinds at once could overwrite each other, so a pod re-reads the subjects
after a pause and adds its kinds again until they stay.

nats-py pull fetches can stall across a server restart: every fetch is bounded by
``wait_for``, and after an error the pull subscription and the consumer are re-created
before fetching again. What a delivery means (attempts, retries, outcomes) is the
kernel's business (``aiwfe.kernel.jobs``); this module only fetches and settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Collection
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .base import ConsumerOptions, DeliveryHandler, Headers, message_size
from .errors import NotAccepted, PayloadTooLarge

__all__ = ["NatsDelivery", "QueueMixin"]

log = logging.getLogger("aiwfe.bus.nats")


class NatsDelivery:
    """A JetStream message as a :class:`~aiwfe.bus.base.Delivery`."""

    __slots__ = ("attempt", "data", "headers", "msg", "seq", "settled")

    def __init__(self, msg: Msg) -> None:
        meta = msg.metadata
        self.msg = msg
        self.data = msg.data
        self.headers: Headers = dict(msg.headers or {})
        self.attempt = int(meta.num_delivered or 1)
        self.seq = int(meta.sequence.stream or 0)
        self.settled = False

    async def ack(self) -> None:
        self.settled = True
        await self.msg.ack()

    async def nak(self, delay_s: float = 0.0) -> None:
        self.settled = True
        await self.msg.nak(delay=delay_s or None)

    async def term(self) -> None:
        self.settled = True
        await self.msg.term()

    async def in_progress(self) -> None:
        await self.msg.in_progress()


class QueueMixin:
    """The work-queue half of NatsBus (see the module docstring)."""

    js: Any
    nc: Any
    prefix: str
    names: dict[str, str]
    replicas: int
    _loops: list[asyncio.Task[Any]]
    _stopping: bool
    _js_publish: Any  # StreamsMixin's lean JetStream publish

    def __init__(self) -> None:
        self._delivery_tasks: set[asyncio.Task[Any]] = set()
        self._fetching: set[asyncio.Task[Any]] = set()
        self._unsettled: dict[int, NatsDelivery] = {}

    def _jobs_stream(self, subjects: list[str]) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.names["jobs"],
            subjects=subjects,
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=self.replicas,
        )

    def _subject(self, kind: str) -> str:
        return f"{self.prefix}.jobs.{kind}"

    def max_payload(self) -> int:
        """The server's ``max_payload`` (from its INFO; nats-py's default before connecting)."""
        return int(self.nc.max_payload) if self.nc is not None else 1024 * 1024

    def check_size(self, subject: str, data: bytes, headers: Headers | None) -> None:
        """Raise PayloadTooLarge for a message the server would refuse (and close the connection for)."""
        size = message_size(data, headers)
        if size > self.max_payload():
            raise PayloadTooLarge(f"{subject}: {size} bytes, over the server's max_payload of {self.max_payload()}")

    async def accept_kinds(self, kinds: Collection[str]) -> None:
        """Add ``kinds`` to the jobs stream's subjects (creating the stream with them).

        A stream still holding the old catch-all ``<prefix>.jobs.>`` is narrowed to the kinds.

        Raises:
            NotAccepted: the stream could not be created or updated.
        """
        mine = {self._subject(k) for k in kinds}
        if not mine:
            return
        name, catch_all = self.names["jobs"], f"{self.prefix}.jobs.>"
        try:
            for _ in range(10):
                try:
                    have = set((await self.js.stream_info(name)).config.subjects or ())
                except nats.js.errors.NotFoundError:
                    with contextlib.suppress(nats.js.errors.BadRequestError):  # another pod created it first
                        await self.js.add_stream(self._jobs_stream(sorted(mine)))
                    continue
                if mine <= have and catch_all not in have:
                    return
                await self.js.update_stream(self._jobs_stream(sorted((have - {catch_all}) | mine)))
                await asyncio.sleep(0.05 + random.random() * 0.1)  # then check that no other pod overwrote them
        except (TimeoutError, nats.errors.Error) as e:
            raise NotAccepted(f"stream {name}: kinds {', '.join(sorted(kinds))} not added: {e!r}") from None
        raise NotAccepted(f"stream {name}: kinds {', '.join(sorted(kinds))} did not stay in its subjects")

    async def retire_kind(self, kind: str) -> None:
        """Stop taking ``kind``: remove it from the jobs stream's subjects, then delete its
        consumer. An operator's step once no pod serves the kind any more; a pod that serves
        it again adds it back when it starts. A job enqueued while this runs is not stranded:
        the subject goes back and the call is refused.

        Raises:
            NotAccepted: jobs of ``kind`` are queued, a pod is still pulling them, it is the
                stream's only kind (a stream keeps a subject; streams are never deleted), or
                the server could not be asked.
        """
        name, subject, durable = self.names["jobs"], self._subject(kind), "jobs_" + kind.replace(".", "_")

        async def queued() -> int:
            info = await self.js.stream_info(name, subjects_filter=subject)
            return int((info.state.subjects or {}).get(subject, 0))

        try:
            try:
                if n := await queued():
                    raise NotAccepted(f"{kind}: {n} job(s) still queued; let a pod serving it finish them first")
            except nats.js.errors.NotFoundError:
                return
            with contextlib.suppress(nats.js.errors.NotFoundError):
                if (await self.js.consumer_info(name, durable)).num_waiting:
                    raise NotAccepted(f"{kind}: a pod is still pulling its jobs (consumer {durable}); stop it first")
            for attempt in range(11):
                have = set((await self.js.stream_info(name)).config.subjects or ())
                if subject not in have:
                    break
                if attempt == 10:
                    raise NotAccepted(f"stream {name}: kind {kind} came back (a pod serving it is running)")
                if not have - {subject}:  # a stream keeps a subject, and no NATS user may delete streams
                    raise NotAccepted(f"{kind}: the jobs stream's only kind stays (a stream keeps at least one subject)")
                await self.js.update_stream(self._jobs_stream(sorted(have - {subject})))
                await asyncio.sleep(0.05 + random.random() * 0.1)  # then check that no pod put it back meanwhile
            if n := await queued():  # enqueued before the subject went: its consumer must stay for it
                await self.accept_kinds([kind])
                raise NotAccepted(f"{kind}: {n} job(s) arrived while retiring it; it stays")
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(name, durable)
        except (TimeoutError, nats.errors.Error) as e:
            raise NotAccepted(f"stream {name}: kind {kind} not retired: {e!r}") from None

    async def job_kinds(self) -> list[str]:
        """The kinds the jobs stream takes (none before any pod accepted one)."""
        try:
            subjects = (await self.js.stream_info(self.names["jobs"])).config.subjects or ()
        except nats.js.errors.NotFoundError:
            return []
        start = len(self.prefix) + len(".jobs.")
        return sorted(s[start:] for s in subjects if s.startswith(f"{self.prefix}.jobs.") and not s.endswith(">"))

    async def enqueue(self, kind: str, data: bytes, headers: Headers, msg_id: str) -> bool:
        """Publish to the jobs stream and wait for its ack; False for a duplicate ``msg_id``.

        Raises:
            PayloadTooLarge: over the server's ``max_payload`` (checked before sending).
            NotAccepted: JetStream did not acknowledge (the caller may retry with the same id),
                or no stream takes ``kind``.
        """
        subject, headers = self._subject(kind), {**headers, "Nats-Msg-Id": msg_id}
        self.check_size(subject, data, headers)
        no_stream = f"no stream takes this kind (no pod consumes or declares {kind})"
        ack = await self._js_publish(subject, data, headers, no_stream=no_stream)
        if ack.error is not None:
            raise NotAccepted(f"{subject}: not accepted by JetStream: {ack.error.description}")
        return not ack.duplicate

    def _consumer_config(self, kind: str, options: ConsumerOptions) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name="jobs_" + kind.replace(".", "_"),
            filter_subject=self._subject(kind),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=options.ack_wait_s,
            max_deliver=options.max_deliver,
            max_ack_pending=max(1000, options.concurrency * 4),
        )

    async def consume(self, kind: str, options: ConsumerOptions, handler: DeliveryHandler) -> None:
        """Create the durable consumer of ``kind`` and start fetching."""
        cfg = self._consumer_config(kind, options)
        await self._ensure_consumer(cfg)
        self._loops.append(asyncio.get_running_loop().create_task(self._fetch_loop(kind, cfg, options, handler)))

    async def queue_stats(self, kind: str) -> tuple[int, float]:
        """(pending + unacked messages of ``kind``, age of the oldest in seconds)."""
        info = await self.js.consumer_info(self.names["jobs"], "jobs_" + kind.replace(".", "_"))
        depth = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        age = 0.0
        if depth:
            first = await self.js.get_msg(self.names["jobs"], seq=1, subject=self._subject(kind), next=True)
            if first.time is not None:
                age = max(0.0, time.time() - first.time.timestamp())
        return depth, age

    async def _ensure_consumer(self, cfg: api.ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(self.names["jobs"], cfg)
        except nats.js.errors.BadRequestError:
            await self.js.delete_consumer(self.names["jobs"], cfg.durable_name)
            await self.js.add_consumer(self.names["jobs"], cfg)

    async def _fetch_loop(self, kind: str, cfg: api.ConsumerConfig, options: ConsumerOptions, handler: DeliveryHandler) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(options.concurrency)
        psub: Any = None
        failures = 0
        held: list[Msg] = []
        beat_at = loop.time()  # when the deliveries held are next told in progress
        try:
            while not self._stopping:
                beat_at = await _take_slot(slots, held, psub, options.ack_wait_s / 3, beat_at)
                free = 1
                while free < 64 and not slots.locked():
                    await slots.acquire()
                    free += 1
                if held:  # what an earlier fetch handed over beyond its free slots runs first
                    msgs, held[:] = held[:free], held[free:]
                else:
                    psub, failures, msgs = await self._fetch(kind, cfg, psub, failures, free, slots)
                    msgs += _queued(psub)
                if len(msgs) > free:
                    # A pull request left open after its fetch returned (the server's expiry and
                    # the client's timer race) delivers into nats-py's queue; its fetch hands all
                    # of it over whatever the batch (a fetch of one takes one and leaves the rest
                    # queued). Everything past the free slots is held here and run as slots free,
                    # its ack wait kept alive meanwhile: the concurrency bound holds, no slot is
                    # released twice, no delivery expires in a queue nobody heartbeats, and none
                    # is counted as an attempt it never had (a nak would count it).
                    held.extend(msgs[free:])
                    msgs = msgs[:free]
                # Fetched while stopping (the open fetch is let finish): they run, and the pod
                # drains them; a nak would count an attempt the job never had.
                for _ in range(free - len(msgs)):
                    slots.release()
                for m in msgs:
                    t = loop.create_task(self._run(NatsDelivery(m), handler, slots))
                    self._delivery_tasks.add(t)
                    t.add_done_callback(self._delivery_tasks.discard)
        finally:
            for m in held:  # a stopping pod gives back what it held
                with contextlib.suppress(Exception):
                    await m.nak()
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()

    async def _fetch(
        self, kind: str, cfg: api.ConsumerConfig, psub: Any, failures: int, free: int, slots: asyncio.Semaphore
    ) -> tuple[Any, int, list[Msg]]:
        """One fetch of up to ``free`` deliveries (nats-py may hand over more, see the caller).
        Returns the pull subscription (None after an error: re-created next time), the count of
        failures in a row, and the deliveries."""
        me = asyncio.current_task()
        try:
            if psub is None:
                psub = await self.js.pull_subscribe_bind(durable=cfg.durable_name, stream=self.names["jobs"])
            # wait_for guards against fetches that never return after a server restart.
            self._fetching.add(me)  # type: ignore[arg-type]
            try:
                msgs: list[Msg] = await asyncio.wait_for(psub.fetch(batch=free, timeout=1.0), timeout=6.0)
            finally:
                self._fetching.discard(me)  # type: ignore[arg-type]
            return psub, 0, msgs
        except (TimeoutError, nats.errors.TimeoutError):
            return psub, 0, []
        except asyncio.CancelledError:
            for _ in range(free):
                slots.release()
            raise
        except Exception as e:
            failures += 1
            log.warning("fetch %s failed (%r); re-creating the pull subscription", kind, e)
            with contextlib.suppress(Exception):
                if psub is not None:
                    await psub.unsubscribe()
            await asyncio.sleep(min(0.2 * failures, 2.0))
            if self.nc is not None and self.nc.is_connected:
                with contextlib.suppress(Exception):
                    await self._ensure_consumer(cfg)
            return None, failures, []

    async def _run(self, d: NatsDelivery, handler: DeliveryHandler, slots: asyncio.Semaphore) -> None:
        key = id(d)
        self._unsettled[key] = d
        try:
            await handler(d)
        except Exception as e:
            log.warning("delivery %d: %r", d.seq, e)
        finally:
            self._unsettled.pop(key, None)
            slots.release()

    async def _stop_fetching(self) -> None:
        """Stop the fetch loops. A loop waiting on the server's answer to a fetch is let
        finish (at most the fetch's 1 s expiry) rather than cancelled: a cancelled fetch
        leaves its pull request open on the server, which would then take the deliveries
        this pod hands back and lose them until their ack wait ran out."""
        fetching = [t for t in self._loops if t in self._fetching]
        for t in self._loops:
            if t not in self._fetching:
                t.cancel()
        if fetching:
            await asyncio.wait(fetching, timeout=7.0)
        for t in self._loops:
            t.cancel()
        for t in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._loops.clear()

    async def _hand_back(self) -> None:
        """Nak every unsettled delivery (a stopping pod gives its work back at once)."""
        for d in list(self._unsettled.values()):
            if not d.settled:
                with contextlib.suppress(Exception):
                    await d.msg.nak()
        self._unsettled.clear()


def _queued(psub: Any) -> list[Msg]:
    """Take the deliveries nats-py's pull subscription has queued (status messages meant for
    pull requests already answered are dropped, as nats-py's fetch drops them)."""
    if psub is None:
        return []
    sub, out = psub._sub, []
    while not sub._pending_queue.empty():
        m = sub._pending_queue.get_nowait()
        sub._pending_size -= len(m.data)
        if not (m.headers and m.headers.get(api.Header.STATUS)):
            out.append(m)
    return out


async def _take_slot(slots: asyncio.Semaphore, held: list[Msg], psub: Any, every_s: float, beat_at: float) -> float:
    """Take one of the consumer's slots. While waiting, at ``beat_at`` (loop time) and every
    ``every_s`` after, take over what arrived in nats-py's queue and tell the server every
    delivery held is in progress, so no ack wait runs out (handing it to another replica) while
    this one holds it. Returns when that is next due: the period runs across calls, because
    slots that free sooner than ``every_s`` would otherwise restart it before it ever ends."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with asyncio.timeout_at(beat_at if psub is not None else None):
                await slots.acquire()
            return beat_at
        except TimeoutError:
            held += _queued(psub)
            beat_at = loop.time() + every_s
            for m in held:
                with contextlib.suppress(Exception):
                    await m.in_progress()
