"""The transport interface every bus implements (NatsBus, LocalBus).

A bus moves bytes and headers; the kernel owns contracts, limits and deadlines. Both
implementations give the same semantics, so the kernel cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import msgspec

from .codec import JobEvent, JobRecord

__all__ = ["Bus", "EventHandler", "Headers", "JobCall", "JobOptions", "JobRunner", "RemoteHandler"]

Headers = dict[str, str]
#: Serves one request: (payload, headers) → (reply payload, reply headers).
RemoteHandler = Callable[[bytes, Headers | None], Awaitable[tuple[bytes, Headers | None]]]
#: Receives one event.
EventHandler = Callable[[bytes, Headers | None], Awaitable[None]]


class JobCall(msgspec.Struct, kw_only=True):
    """One delivery of a job handed to a runner."""

    job_id: str
    kind: str
    data: bytes
    headers: Headers
    attempt: int
    max_deliver: int


#: Runs one job delivery and returns the encoded result; raises to fail the attempt.
JobRunner = Callable[[JobCall], Awaitable[bytes]]


class JobOptions(msgspec.Struct, frozen=True, kw_only=True):
    """Consumer settings of one job kind (see kernel.plugin.HandlerOptions)."""

    concurrency: int = 64
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    backoff_s: tuple[float, ...] = (1.0, 5.0, 30.0)


class Bus(Protocol):
    """What the kernel needs from a transport."""

    prefix: str

    async def start(self) -> None:
        """Connect and create streams. Raises Unavailable when the server cannot be reached."""

    async def close(self) -> None:
        """Release everything. Unacked jobs stay in the stream and are redelivered."""

    def ready(self) -> str | None:
        """None when connected, else the reason."""

    async def request(self, subject: str, data: bytes, headers: Headers | None, timeout_s: float) -> tuple[bytes, Headers | None]:
        """Send a request; raise DeadlineExceeded on timeout and Unavailable with no responder."""

    async def publish(self, subject: str, data: bytes, headers: Headers | None = None) -> None:
        """Fire-and-forget publish (events)."""

    async def serve(self, subject: str, handler: RemoteHandler) -> None:
        """Answer requests on ``subject``; replicas share them (queue group = subject)."""

    async def subscribe(self, subject: str, handler: EventHandler) -> None:
        """Receive every event on ``subject`` (fan-out, no queue group)."""

    async def submit(self, kind: str, data: bytes, headers: Headers, job_id: str) -> bool:
        """Durably enqueue a job; False when ``job_id`` was already submitted."""

    async def consume(self, kind: str, options: JobOptions, runner: JobRunner) -> None:
        """Start consuming jobs of ``kind`` with ``runner``."""

    async def flush(self) -> None:
        """Return once the server has processed everything sent so far (subscriptions included)."""

    async def stop_taking_work(self) -> None:
        """Stop receiving new requests, events and jobs; in-flight work continues."""

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait for in-flight work to finish; True when it all did within the limit."""

    async def claim_job(self, job_id: str, owner: str) -> str:
        """Record ``owner`` as the job's owner unless it has one; return the owner on record."""

    async def job_owner(self, job_id: str) -> str | None:
        """The job's owner, or None for a job never submitted with one."""

    async def job_record(self, job_id: str) -> JobRecord | None:
        """The stored outcome of a job, or None while it is pending or unknown."""

    async def emit(self, job_id: str, type: str, data: bytes, msg_id: str | None = None) -> int:
        """Append an event to a job's event stream; return its sequence (``msg_id``: dedupe)."""

    def job_events(self, job_id: str, after_seq: int = 0) -> AsyncIterator[JobEvent]:
        """Replay then follow a job's events with sequence > ``after_seq``."""
        ...

    async def cancel_job(self, job_id: str, reason: str) -> bool:
        """Record the job cancelled (unless finished) and stop it wherever it runs."""

    async def answer(self, subject: str, provider: Callable[[], dict[str, Any]]) -> None:
        """Answer every request on ``subject`` (no queue group) with ``provider()`` as JSON."""

    async def gather(self, subject: str, timeout_s: float) -> list[dict[str, Any]]:
        """Send one request on ``subject`` and collect every answer within ``timeout_s``."""

    async def dead_letters(self, kind: str | None = None) -> list[tuple[bytes, Headers]]:
        """Dead-lettered jobs (payload and headers, including the reason)."""

    async def replay_dead_letters(self, kind: str | None = None, job_id: str | None = None) -> list[str]:
        """Re-queue dead-lettered jobs under their own ids; returns the ids replayed."""
