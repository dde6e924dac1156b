"""NatsBus's streams and bucket (the jobs stream is created by the first pod that accepts a
kind: :mod:`aiwfe.bus.nats_queue`): ``<PREFIX>_EVENTS (``<prefix>.events.>``, limited by
age), ``<PREFIX>_DLQ`` (``<prefix>.dlq.>``) and the KV bucket ``<PREFIX>_RESULTS``
(history 1, create-only writes for records written once).

The per-job operations (publishing to a stream, creating and reading a record) go through
:meth:`FastClient.call <aiwfe.bus._client.FastClient.call>` and decode the server's answer
with msgspec instead of nats-py's ``js.publish`` / ``KeyValue``: the same requests on the
wire, at less than half the client CPU, which is what bounds job throughput on a small
machine (``aiwfe bench jobs``). Anything unusual (a record over a delete marker, a bucket
without direct reads) takes nats-py's own path.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KeyValue

from .base import Headers, StreamMessage
from .errors import BusError, NotAccepted
from .wheel import DeadlineWheel

__all__ = ["StreamsMixin"]

_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError, nats.js.errors.InvalidKeyError)
_KEY = re.compile(r"[-/_=.a-zA-Z0-9]+")  # nats-py's rule for KV keys (no subject tokens beyond these)
_WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code when an expected last sequence does not match


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_puback = msgspec.json.Decoder(_PubAck)


def _valid_key(key: str) -> bool:
    return bool(key) and key[0] != "." and key[-1] != "." and _KEY.fullmatch(key) is not None


class StreamsMixin:
    """The streams-and-bucket half of NatsBus."""

    js: Any
    nc: Any
    _wheel: DeadlineWheel
    prefix: str
    names: dict[str, str]
    replicas: int
    event_ttl_s: float
    dlq_ttl_s: float
    result_ttl_s: float
    _kv: Any
    _followers: set[Any]  # the ordered consumers of follow() (re-created on reconnect: _refollow)

    def check_size(self, subject: str, data: bytes, headers: Headers | None) -> None:
        raise NotImplementedError

    async def _ensure_streams(self) -> None:
        n, p = self.names, self.prefix
        configs = [
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
            for attempt in range(3):
                try:
                    await self.js.add_stream(cfg)
                    break
                except nats.js.errors.BadRequestError:  # it exists: another pod's, or an older config
                    try:
                        await self.js.update_stream(cfg)
                        break
                    except nats.js.errors.NotFoundError:  # refused as overlapping while another pod creates it
                        if attempt == 2:
                            raise
                        await asyncio.sleep(0.05 * (attempt + 1))
        self._kv = await self._results_bucket(n["results"])

    async def _results_bucket(self, bucket: str) -> KeyValue:
        """Bind the results bucket, creating it if it does not exist.

        Pods starting at once race to create it; the loser's create is refused ("subjects
        overlap with an existing stream" on 2.9), and it binds the winner's bucket instead.
        """
        for attempt in range(3):
            try:
                return await self.js.key_value(bucket)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                # direct: reads are answered as raw messages (no JSON API envelope, no base64),
                # a jobs worker reads the record of every delivery (aiwfe bench jobs).
                return await self.js.create_key_value(
                    bucket=bucket,
                    history=1,
                    ttl=self.result_ttl_s,
                    storage=api.StorageType.FILE,
                    replicas=self.replicas,
                    direct=True,
                )
            except nats.js.errors.BadRequestError:
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))  # another pod is creating it
        raise AssertionError("unreachable")

    async def _js_publish(
        self, subject: str, data: bytes, headers: Headers, timeout_s: float = 5.0, *, no_stream: str = "no stream takes it"
    ) -> _PubAck:
        """Publish to a stream and wait for its ack (the ack's ``error`` is the caller's to judge).

        Raises:
            NotAccepted: no stream takes ``subject`` (``no_stream`` says so), no answer in
                time, a malformed ack.
        """
        with _ack_errors(subject, no_stream):
            msg = await self.nc.call(subject, data, timeout_s, self._wheel, headers=headers or None)
            return _puback.decode(msg.data)

    def _stream_of(self, subject: str) -> str:
        role = subject[len(self.prefix) + 1 :].split(".", 1)[0]
        return self.names[role]

    # -- streams -------------------------------------------------------------------

    async def append(self, subject: str, data: bytes, headers: Headers, msg_id: str | None = None) -> int:
        """Publish to the stream of ``subject`` and wait for its ack; return the sequence."""
        if msg_id:
            headers = {**headers, "Nats-Msg-Id": msg_id}
        self.check_size(subject, data, headers)
        ack = await self._js_publish(subject, data, headers)
        if ack.error is not None:
            raise NotAccepted(f"{subject}: not accepted by JetStream: {ack.error.description}")
        return ack.seq

    async def append_many(self, subject: str, items: list[tuple[bytes, Headers]], timeout_s: float = 5.0) -> list[int]:
        """Publish each of ``items`` to the stream of ``subject`` in this order, back to back,
        then wait for every ack; return the sequences (one round trip for all)."""
        for data, headers in items:
            self.check_size(subject, data, headers)
        with _ack_errors(subject, "no stream takes it"):
            msgs = await self.nc.call_many(subject, [(d, h or None) for d, h in items], timeout_s, self._wheel)
            acks = [_puback.decode(m.data) for m in msgs]
        for ack in acks:
            if ack.error is not None:
                raise NotAccepted(f"{subject}: not accepted by JetStream: {ack.error.description}")
        return [ack.seq for ack in acks]

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
        self._followers.add(sub)
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
            self._followers.discard(sub)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _refollow(self) -> None:
        """After a reconnect, re-create every follower's ordered consumer after the last
        sequence it received. The consumers live in the server's memory: a restarted server
        has lost them, and nats-py noticed only when two 5 s idle heartbeats were missed (a
        follower stalled about 20 s). After a mere network blip the old one is dropped by the
        server once idle; the new one starts where the follower was (no gap, no repeat). The
        events stream is waited for first (up to 10 s): JetStream may need a moment after a
        restart, and a consumer create it refused would be retried only by that check."""
        for _ in range(100):
            try:
                await self.js.stream_info(self.names["events"])
                break
            except Exception:
                await asyncio.sleep(0.1)
        for sub in list(self._followers):
            jsi = getattr(sub._sub, "_jsi", None)  # nats-py's state of the push subscription
            if jsi is not None and jsi._ordered:
                with contextlib.suppress(Exception):
                    await jsi.reset_ordered_consumer(jsi._sseq + 1)

    async def last_seq(self, subject: str) -> int:
        """The sequence of the last message stored under ``subject``, 0 for none.

        Raises:
            BusError: the server did not answer.
        """
        try:
            m = await self.js.get_last_msg(self._stream_of(subject), subject)
        except nats.js.errors.NotFoundError:
            return 0
        except (TimeoutError, nats.errors.Error) as e:
            raise BusError(f"{subject}: last message not read: {e!r}") from None
        return int(m.seq or 0)

    async def read(self, subject: str, last: int | None = None) -> list[StreamMessage]:
        """Every message stored under ``subject`` now (wildcards allowed); ``last``: only among
        the stream's newest ``last`` messages."""
        out: list[StreamMessage] = []
        info = await self.js.stream_info(self._stream_of(subject))
        if info.state.messages == 0:
            return out
        if last is not None and last > 0:
            start = max(int(info.state.first_seq or 1), int(info.state.last_seq or 0) - last + 1)
            policy: dict[str, Any] = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "config": api.ConsumerConfig(opt_start_seq=start),
            }
        else:
            policy = {"deliver_policy": api.DeliverPolicy.ALL}
        sub = await self.js.subscribe(subject, ordered_consumer=True, **policy)
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
        if not _valid_key(key):
            raise NotAccepted(f"bucket {self.names['results']}: invalid key {key!r}")
        ack = await self._js_publish(f"{self._kv._pre}{key}", value, {"Nats-Expected-Last-Subject-Sequence": "0"})
        if ack.error is None:
            return True
        if ack.error.err_code != _WRONG_LAST_SEQUENCE:
            raise NotAccepted(f"bucket {self.names['results']}: {key} not stored: {ack.error.description}")
        try:  # the key has a value or a delete marker: nats-py's create tells them apart
            await self._kv.create(key, value)
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except (TimeoutError, nats.errors.Error) as e:
            raise NotAccepted(f"bucket {self.names['results']}: {key} not stored: {e!r}") from None

    async def kv_get(self, key: str) -> bytes | None:
        """The value of ``key``, or None. Raises BusError when the server does not answer."""
        if not _valid_key(key):
            return None
        if self._kv._direct:  # a raw-message read: no JSON envelope, no base64
            subject = f"{self._kv._pre}{key}"
            try:
                msg = await self.nc.call(f"{self.js._prefix}.DIRECT.GET.{self._kv._stream}.{subject}", b"", 5.0, self._wheel)
            except (TimeoutError, nats.errors.Error) as e:
                raise BusError(f"bucket {self.names['results']}: {key} not read: {e!r}") from None
            h = msg.headers or {}
            if h.get("Status") or h.get("KV-Operation") in ("DEL", "PURGE") or h.get("Nats-Subject", subject) != subject:
                return None
            return msg.data or None
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


@contextlib.contextmanager
def _ack_errors(subject: str, no_stream: str) -> Iterator[None]:
    """Map a JetStream publish's failures to NotAccepted (``uncertain`` when no answer came:
    the message may have been stored)."""
    try:
        yield
    except nats.errors.NoRespondersError:
        raise NotAccepted(f"{subject}: {no_stream}") from None
    except (TimeoutError, nats.errors.Error) as e:
        raise NotAccepted(f"{subject}: not confirmed by JetStream: {e!r}", uncertain=True) from None
    except msgspec.DecodeError as e:
        raise NotAccepted(f"{subject}: not accepted by JetStream: {e!r}") from None
