"""NatsBus's work queue: one work-queue stream (``<PREFIX>_JOBS``, subjects
``<prefix>.jobs.<kind>``), one durable pull consumer per kind shared by every replica,
explicit acks, ``Nats-Msg-Id`` dedupe within a 2-minute window.

nats-py pull fetches can stall across a server restart: every fetch is bounded by
``wait_for``, and after an error the pull subscription and the consumer are re-created
before fetching again. What a delivery means (attempts, retries, outcomes) is the
kernel's business (``aiwfe.kernel.jobs``); this module only fetches and settles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import api

from .base import ConsumerOptions, DeliveryHandler, Headers
from .errors import NotAccepted

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

    def _jobs_stream(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.names["jobs"],
            subjects=[f"{self.prefix}.jobs.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=self.replicas,
        )

    def _subject(self, kind: str) -> str:
        return f"{self.prefix}.jobs.{kind}"

    async def enqueue(self, kind: str, data: bytes, headers: Headers, msg_id: str) -> bool:
        """Publish to the jobs stream and wait for its ack; False for a duplicate ``msg_id``.

        Raises:
            NotAccepted: JetStream did not acknowledge (the caller may retry with the same id).
        """
        subject = self._subject(kind)
        ack = await self._js_publish(subject, data, {**headers, "Nats-Msg-Id": msg_id})
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
        while not self._stopping:
            await slots.acquire()
            free = 1
            while free < 64 and not slots.locked():
                await slots.acquire()
                free += 1
            me = asyncio.current_task()
            try:
                if psub is None:
                    psub = await self.js.pull_subscribe_bind(durable=cfg.durable_name, stream=self.names["jobs"])
                # wait_for guards against fetches that never return after a server restart.
                self._fetching.add(me)  # type: ignore[arg-type]
                try:
                    msgs = await asyncio.wait_for(psub.fetch(batch=free, timeout=1.0), timeout=6.0)
                finally:
                    self._fetching.discard(me)  # type: ignore[arg-type]
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
            if self._stopping:  # fetched while stopping: give them back at once
                for m in msgs:
                    with contextlib.suppress(Exception):
                        await m.nak()
                msgs = []
            for _ in range(free - len(msgs)):
                slots.release()
            for m in msgs:
                t = loop.create_task(self._run(NatsDelivery(m), handler, slots))
                self._delivery_tasks.add(t)
                t.add_done_callback(self._delivery_tasks.discard)
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

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
