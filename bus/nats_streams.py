"""NatsBus's streams and bucket: ``<PREFIX>_EVENTS`` (``<prefix>.events.>``, limited by
age), ``<PREFIX>_DLQ`` (``<prefix>.dlq.>``) and the KV bucket ``<PREFIX>_RESULTS``
(history 1, create-only writes for records written once)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from .base import Headers, StreamMessage
from .errors import BusError, NotAccepted

__all__ = ["StreamsMixin"]

_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError)


class StreamsMixin:
    """The streams-and-bucket half of NatsBus."""

    js: Any
    prefix: str
    names: dict[str, str]
    replicas: int
    event_ttl_s: float
    dlq_ttl_s: float
    result_ttl_s: float
    _kv: Any

    def _jobs_stream(self) -> api.StreamConfig:
        raise NotImplementedError

    async def _ensure_streams(self) -> None:
        n, p = self.names, self.prefix
        configs = [
            self._jobs_stream(),
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

    def _stream_of(self, subject: str) -> str:
        role = subject[len(self.prefix) + 1 :].split(".", 1)[0]
        return self.names[role]

    # -- streams -------------------------------------------------------------------

    async def append(self, subject: str, data: bytes, headers: Headers, msg_id: str | None = None) -> int:
        """Publish to the stream of ``subject`` and wait for its ack; return the sequence."""
        if msg_id:
            headers = {**headers, "Nats-Msg-Id": msg_id}
        try:
            ack = await self.js.publish(subject, data, headers=headers or None, timeout=5.0)
        except (TimeoutError, nats.errors.Error) as e:
            raise NotAccepted(f"{subject}: not accepted by JetStream: {e!r}") from None
        return int(ack.seq)

    async def follow(self, subject: str, after_seq: int = 0) -> AsyncIterator[StreamMessage]:
        """Replay ``subject`` after ``after_seq`` (an ordered consumer), then follow it."""
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
                if seq > after_seq:
                    yield StreamMessage(seq, m.subject, dict(m.headers or {}), m.data)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def read(self, subject: str) -> list[StreamMessage]:
        """Every message stored under ``subject`` now (wildcards allowed)."""
        out: list[StreamMessage] = []
        info = await self.js.stream_info(self._stream_of(subject))
        if info.state.messages == 0:
            return out
        sub = await self.js.subscribe(subject, ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
        try:
            while True:
                try:
                    m = await sub.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    break
                out.append(StreamMessage(m.metadata.sequence.stream, m.subject, dict(m.headers or {}), m.data))
                if m.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return out

    async def delete(self, subject: str, seq: int) -> None:
        """Delete message ``seq`` of the stream holding ``subject``."""
        await self.js.delete_msg(self._stream_of(subject), seq)

    # -- the bucket ------------------------------------------------------------------

    async def kv_create(self, key: str, value: bytes) -> bool:
        """Store once; False when ``key`` exists. Raises NotAccepted."""
        try:
            await self._kv.create(key, value)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except (TimeoutError, nats.errors.Error) as e:
            raise NotAccepted(f"bucket {self.names['results']}: {key} not stored: {e!r}") from None

    async def kv_get(self, key: str) -> bytes | None:
        """The value of ``key``, or None. Raises BusError when the server does not answer."""
        try:
            entry = await self._kv.get(key)
        except _MISSING:
            return None
        except (TimeoutError, nats.errors.Error) as e:
            raise BusError(f"bucket {self.names['results']}: {key} not read: {e!r}") from None
        return entry.value or None

    async def kv_delete(self, key: str) -> None:
        """Remove ``key``."""
        with contextlib.suppress(*_MISSING):
            await self._kv.delete(key)
