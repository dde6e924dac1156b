"""What a bus offers, as small protocols by role. NatsBus and LocalBus implement them all.

A bus moves bytes and headers: request/reply and fan-out (:class:`Transport`), a durable
work queue with acknowledgements (:class:`WorkQueue`), append-only streams read by sequence
(:class:`Streams`), and a key-value bucket with create-once writes (:class:`KeyValue`).
It knows nothing of contracts, jobs, retries or outcomes: those are the kernel's
(``aiwfe.kernel.jobs``), the same on either bus. Failures are :mod:`aiwfe.bus.errors`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Protocol

import msgspec

__all__ = [
    "Bus",
    "ConsumerOptions",
    "Delivery",
    "DeliveryHandler",
    "EventHandler",
    "Headers",
    "KeyValue",
    "RemoteHandler",
    "StreamMessage",
    "Streams",
    "Transport",
    "WorkQueue",
    "message_size",
]

Headers = dict[str, str]
#: Serves one request: (payload, headers) → (reply payload, reply headers).
RemoteHandler = Callable[[bytes, Headers | None], Awaitable[tuple[bytes, Headers | None]]]
#: Receives one published message.
EventHandler = Callable[[bytes, Headers | None], Awaitable[None]]


def message_size(data: bytes, headers: Headers | None) -> int:
    """The size NATS counts against ``max_payload``: the payload plus the encoded header block."""
    if not headers:
        return len(data)
    n = len(data) + 12
    for k, v in headers.items():  # a loop, not a generator: it runs for every message sent
        n += len(k) + (len(v) if v.isascii() else len(v.encode())) + 4
    return n


class Delivery(Protocol):
    """One delivery of a queued message. Settle it once: ack, nak or term; a delivery
    left unsettled (its worker died or stopped) comes back after the ack wait."""

    data: bytes
    headers: Headers
    #: 1 for the first delivery, counted by the server across redeliveries.
    attempt: int
    #: The message's sequence in the queue.
    seq: int

    async def ack(self) -> None:
        """Done: remove the message."""

    async def nak(self, delay_s: float = 0.0) -> None:
        """Redeliver after ``delay_s``."""

    async def term(self) -> None:
        """Never redeliver."""

    async def in_progress(self) -> None:
        """Still working: restart the ack wait."""


#: Handles one delivery (and settles it).
DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class ConsumerOptions(msgspec.Struct, frozen=True, kw_only=True):
    """A durable consumer: deliveries in flight in this process, the ack wait, and the
    number of deliveries after which the server stops redelivering."""

    concurrency: int = 64
    ack_wait_s: float = 30.0
    max_deliver: int = 6


class StreamMessage(msgspec.Struct, frozen=True):
    """A message read from a stream."""

    seq: int
    subject: str
    headers: Headers
    data: bytes


class Transport(Protocol):
    """Connection, request/reply and fan-out."""

    prefix: str

    async def start(self) -> None:
        """Connect and create the streams and the bucket. Raises NotConnected."""

    async def close(self) -> None:
        """Release everything. Unsettled deliveries are redelivered."""

    def ready(self) -> str | None:
        """None when connected, else the reason."""

    def max_payload(self) -> int:
        """The largest message (payload plus headers) the server accepts, in bytes."""

    async def flush(self) -> None:
        """Return once the server has processed everything sent so far (subscriptions included)."""

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Send a request. Raises BusTimeout, NoResponders or NotConnected; a request without
        ``headers`` (a kernel call) also CalleeLost when its callee goes silent (NatsBus)."""

    async def request_many(self, subject: str, data: bytes, timeout_s: float) -> list[bytes]:
        """Send one request and collect every reply that arrives within ``timeout_s``."""

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Fire-and-forget publish."""

    async def serve(self, subject: str, handler: RemoteHandler, *, queue: bool = True) -> None:
        """Answer requests on ``subject``. ``queue``: replicas share them (queue group =
        subject); otherwise every subscriber answers (for :meth:`request_many`)."""

    async def subscribe(self, subject: str, handler: EventHandler, *, until_close: bool = False) -> None:
        """Receive every message on ``subject`` (no queue group). ``until_close``: kept
        through :meth:`stop_taking_work` (control messages a draining pod still needs)."""

    async def stop_taking_work(self) -> None:
        """Stop receiving requests, messages and deliveries; in-flight work continues."""

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight handlers; at the limit hand unsettled deliveries back (nak) and
        cancel what still runs. True when everything finished in time."""


class WorkQueue(Protocol):
    """A durable work queue per kind (``<prefix>.jobs.<kind>``), one shared consumer per kind.

    The queue takes only the kinds some pod declared (:meth:`accept_kinds`): a message of
    any other kind is refused with NotAccepted instead of being kept where no consumer
    will ever take it.
    """

    async def accept_kinds(self, kinds: Collection[str]) -> None:
        """Make the queue take ``kinds`` too (kinds accepted before stay). Raises NotAccepted."""

    async def job_kinds(self) -> list[str]:
        """The kinds the queue takes now, sorted."""

    async def retire_kind(self, kind: str) -> None:
        """Stop taking ``kind`` (an operator's step once no pod serves it). Raises NotAccepted
        while jobs of it are queued or a pod still takes them."""

    async def enqueue(self, kind: str, data: bytes, headers: Headers, msg_id: str) -> bool:
        """Durably enqueue; False when ``msg_id`` was enqueued before (dedupe).

        Raises NotAccepted (a kind the queue does not take), PayloadTooLarge."""

    async def consume(self, kind: str, options: ConsumerOptions, handler: DeliveryHandler) -> None:
        """Start handing deliveries of ``kind`` to ``handler``, each in its own task."""

    async def queue_stats(self, kind: str) -> tuple[int, float]:
        """(messages queued or in flight, age in seconds of the oldest)."""


class Streams(Protocol):
    """Append-only streams (``<prefix>.events.>``, ``<prefix>.dlq.>``), read by sequence."""

    async def append(self, subject: str, data: bytes, headers: Headers, msg_id: str | None = None) -> int:
        """Append; return the sequence. A repeated ``msg_id`` is dropped (the first one's
        sequence is returned). Raises NotAccepted."""

    async def append_many(self, subject: str, items: list[tuple[bytes, Headers]]) -> list[int]:
        """Append several messages to ``subject`` in this order (no ``msg_id``), sent back to
        back and confirmed together; return their sequences once every one is confirmed.
        Raises NotAccepted (then later ones may be stored too)."""

    def follow(self, subject: str, after_seq: int = 0) -> AsyncIterator[StreamMessage]:
        """Replay the messages on ``subject`` after ``after_seq``, then follow new ones."""
        ...

    async def last_seq(self, subject: str) -> int:
        """The sequence of the last message stored under ``subject`` (no wildcards), 0 for none."""

    async def read(self, subject: str, last: int | None = None) -> list[StreamMessage]:
        """Every message stored under ``subject`` (wildcards allowed) right now; ``last``: only
        among the stream's newest ``last`` messages (a bounded read of a large stream)."""

    async def delete(self, subject: str, seq: int) -> None:
        """Delete one message of the stream that holds ``subject``."""


class KeyValue(Protocol):
    """One bucket (``<PREFIX>_RESULTS``) with create-once writes."""

    async def kv_create(self, key: str, value: bytes) -> bool:
        """Store ``value`` unless ``key`` exists; True when this call stored it."""

    async def kv_get(self, key: str) -> bytes | None:
        """The value, or None."""

    async def kv_delete(self, key: str) -> None:
        """Remove ``key`` (no error when absent)."""


class Bus(Transport, WorkQueue, Streams, KeyValue, Protocol):
    """Everything the kernel uses of a transport."""
