"""Fair share at the edge: server-side caps on client budgets, and per-owner job slots.

Both apply where a job enters from outside — ``Kernel.submit_json`` (the gateway's path) and
the ``<prefix>.submit.<kind>`` subjects (:mod:`aiwfe.kernel.submitting`) — never to jobs a
plugin submits with ``Kernel.submit`` (trusted code sets what budgets it likes).

**Caps.** A job contract may declare ``input_caps: ClassVar[Mapping[str, float | str]]``:
field → the largest value a client may send (a string names another field of the same job:
``min_answers`` at most ``max_experts``). The manifest overrides or adds caps per kind::

    [system.jobs."helios.ask"]
    max_per_owner = 8
    caps = { max_experts = 12, latency_s = 60 }

A value over its cap is refused with ``BadInput`` naming the field, the value and the cap,
before anything is recorded (HTTP 400, an ``error`` frame, ``BadInput`` on NATS). Nothing is
clamped silently. ``None`` (unset) values are not checked.

**Slots.** Each owner (the gateway's user id) may have at most ``max_per_owner`` jobs of a
kind not yet finished (unset: the contract's ``max_jobs_per_owner: ClassVar[int]``, else
:data:`DEFAULT_PER_OWNER`; the gateway learns the contract's value from the consumer's
validate-only answer when the consumer runs in another pod); the NATS submit subjects act for no user (owner ``~submit``: NATS
does not tell a subscriber who published), so all their publishers share one pool of
``max_submitted`` slots per kind. A slot is a create-only key ``quota.<kind>.<owner
hash>.<i>`` (``i`` < the limit) in the jobs' key-value bucket, so every gateway replica and
pod counts against the same slots and a race is decided by the server, not by a read and a
write. The lease in a slot holds the job id and when it expires (:meth:`JobQuotas.hold_s`:
a backstop of ``lease_s``, 30 minutes by default, for a job that never gets an outcome).

Slots are freed lazily, by the submission that finds them all taken: a slot whose job has an
outcome record (done, failed, cancelled) or whose lease expired is reclaimed, so a finished
job's slot is free for the next submission at once, a queued or retried job keeps its slot
however long the queue, and a slot leaked by a crash frees itself at its expiry. Two submitters
may reclaim the same stale slot at once: only the one that creates the marker
``<slot>.freed.<lease hash>`` deletes it, so a delete never removes a newer lease (markers
expire with the bucket). A full set of slots answers :class:`TooManyJobs` (retryable, with
``retry_after_s``): HTTP 429 with ``Retry-After``, a ``too_many_jobs`` error frame, and
``Overloaded`` on NATS. A pod that found an owner's slots full refuses its next submissions for
:data:`FULL_MEMO_S` without asking the bucket. Without the key-value bucket nothing is
submitted anyway (the owner entry lives there too): ``Unavailable``, and no in-memory fallback
that would let each pod admit the limit on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from .errors import BadInput, ConfigError, Overloaded

__all__ = ["DEFAULT_PER_OWNER", "JobLimits", "JobQuotas", "TooManyJobs", "caps_of", "check_caps"]

#: After finding an owner's slots full, this pod refuses its next submissions of the kind
#: for this long without asking the bucket (a flood of refused submissions stays cheap).
FULL_MEMO_S = 0.25
#: Unfinished jobs per user of a kind that neither the manifest nor its contract limits.
DEFAULT_PER_OWNER = 64


class JobLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The limits of one job kind (``[system.jobs."<address>"]``).

    ``max_per_owner``: jobs not yet finished per gateway user (0: no limit; unset: the
    contract's ``max_jobs_per_owner``, else :data:`DEFAULT_PER_OWNER`);
    ``max_submitted``: the same for all NATS submit-subject publishers together;
    ``caps``: field → largest value a client may send (added to the contract's ``input_caps``);
    ``lease_s``: the backstop — a slot whose job never gets an outcome record (the submitting
    pod died between taking the slot and queueing the job) frees itself after this long, or
    after the job's ``deadline_s`` when that is longer; ``lease_grace_s`` is added to it;
    ``retry_after_s``: the hint given with ``TooManyJobs``.
    """

    max_per_owner: int | None = None
    max_submitted: int = 64
    caps: dict[str, float] = {}
    lease_s: float = 1800.0
    lease_grace_s: float = 60.0
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        if (self.max_per_owner or 0) < 0 or self.max_submitted < 0:
            raise ValueError("max_per_owner and max_submitted must not be negative (0: no limit)")
        if min(self.lease_s, self.lease_grace_s, self.retry_after_s) <= 0:
            raise ValueError("lease_s, lease_grace_s and retry_after_s must be positive")


class TooManyJobs(Overloaded):
    """The owner already has as many unfinished jobs of this kind as it may (retryable)."""

    code = "too_many_jobs"


class _Lease(msgspec.Struct, frozen=True, array_like=True):
    job_id: str
    expires_at: float


class _Deadline(msgspec.Struct):
    deadline_s: float | None = None


_lease_enc = msgspec.msgpack.Encoder()
_lease_dec = msgspec.msgpack.Decoder(_Lease)
_deadline_dec = msgspec.json.Decoder(_Deadline)


def caps_of(contract: type, limits: JobLimits) -> dict[str, float | str]:
    """The caps of ``contract``: its ``input_caps`` overridden by the manifest's.

    Raises:
        ConfigError: a manifest cap names no field of the contract.
    """
    fields = {f.name for f in msgspec.structs.fields(contract)}
    unknown = sorted(set(limits.caps) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"caps name no field of {contract.__name__}: {', '.join(unknown)} (fields: {known})")
    return {**getattr(contract, "input_caps", {}), **limits.caps}


def check_caps(address: str, job: Any, caps: Mapping[str, float | str]) -> None:
    """Refuse ``job`` when a client-set value is over its cap.

    Raises:
        BadInput: naming every field over its cap, with value and cap.
    """
    over = []
    for field, cap in caps.items():
        value = getattr(job, field, None)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # unset (None) or not a number
        limit = getattr(job, cap) if isinstance(cap, str) else cap
        if not math.isfinite(value) or value > limit:  # NaN compares False: refuse it, not pass it
            named = f"{cap} = {limit}" if isinstance(cap, str) else f"{limit:g}"
            over.append(f"{field} = {value:g} is over its cap ({named})")
    if over:
        raise BadInput(f"{address}: {'; '.join(over)} (server-side caps: [system.jobs.{address!r}].caps)")


class JobQuotas:
    """Per-owner job slots in ``bus``'s key-value bucket (see the module docstring).

    ``limits``: address → :class:`JobLimits` (kinds not named get the defaults);
    ``finished``: job id → whether it has an outcome record (``Jobs.record`` is not None).
    """

    def __init__(self, bus: Any, finished: Any, limits: Mapping[str, JobLimits] | None = None) -> None:
        self.bus = bus
        self.finished = finished
        self.limits: Mapping[str, JobLimits] = limits or {}
        self.default = JobLimits()
        self._full: dict[str, float] = {}  # slot key prefix → monotonic time until which it is full

    def of(self, address: str) -> JobLimits:
        """The limits of job kind ``address``."""
        return self.limits.get(address, self.default)

    def hold_s(self, address: str, job: Any = None, data: bytes | None = None) -> float:
        """How long a slot of this job is leased: ``lease_s`` or its ``deadline_s`` (from the
        decoded ``job`` or its JSON ``data``), whichever is longer, plus ``lease_grace_s``.

        The lease is a backstop only: a slot is reclaimed as soon as its job has an outcome
        record, and every job the stream took gets one (done, failed, dead-lettered with
        ``WorkerLost``, cancelled). A lease near the deadline would stop counting jobs that wait
        in a backlogged queue or between retries, letting an owner past its limit."""
        lim = self.of(address)
        deadline = getattr(job, "deadline_s", None)
        if job is None and data is not None:
            try:
                deadline = _deadline_dec.decode(data).deadline_s
            except msgspec.DecodeError:
                deadline = None  # validated elsewhere; a bad value cannot shorten the lease
        if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not deadline > 0:
            deadline = lim.lease_s
        return max(lim.lease_s, float(deadline)) + lim.lease_grace_s

    async def acquire(
        self, address: str, owner: str, job_id: str, hold_s: float, *, submitted: bool = False, declared: int | None = None
    ) -> str | None:
        """Take a slot of ``owner`` for ``job_id`` (``submitted``: the shared NATS pool;
        ``declared``: the contract's ``max_jobs_per_owner``); return its key (for
        :meth:`release` when queueing fails), None when there is no limit.

        Raises:
            TooManyJobs: every slot is held by an unfinished job with a live lease.
            BusError: the bucket did not answer (callers map it to Unavailable).
        """
        lim = self.of(address)
        if submitted:
            limit = lim.max_submitted
        elif lim.max_per_owner is not None:
            limit = lim.max_per_owner
        else:
            limit = DEFAULT_PER_OWNER if declared is None else declared
        if limit == 0:
            return None
        base = f"quota.{address}.{hashlib.sha256(owner.encode()).hexdigest()[:32]}"
        if self._full.get(base, 0.0) > time.monotonic():  # found full a moment ago: no bucket round trips
            raise self._refusal(address, limit, submitted, lim)
        lease = _lease_enc.encode(_Lease(job_id, time.time() + hold_s))
        keys = [f"{base}.{i}" for i in range(limit)]
        first = keys[random.randrange(limit)]  # a user below the limit: usually one round trip
        if await self._take(first, lease):
            return first
        for _ in range(3):
            free = await self._free(keys)
            for key in free:
                if await self._take(key, lease):
                    return key
            if not free:
                break
        if len(self._full) > 10_000:
            self._full.clear()
        self._full[base] = time.monotonic() + FULL_MEMO_S
        raise self._refusal(address, limit, submitted, lim)

    @staticmethod
    def _refusal(address: str, limit: int, submitted: bool, lim: JobLimits) -> TooManyJobs:
        who = "submit subject" if submitted else "user"
        return TooManyJobs(
            f"too many jobs: {limit} {address} jobs of this {who} are not finished (limit {limit}); retry when one has finished",
            retry_after_s=lim.retry_after_s,
        )

    async def _take(self, key: str, lease: bytes) -> bool:
        """Create slot ``key`` holding ``lease``. Cancelled on the way (the caller left), the
        slot is given back if the create went through: it would stay held for the whole lease
        by a job that is never queued."""
        try:
            return await self.bus.kv_create(key, lease)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                if await self.bus.kv_get(key) == lease:
                    await self.bus.kv_delete(key)
            raise

    async def release(self, key: str) -> None:
        """Give back a slot taken by :meth:`acquire` whose job was not queued after all."""
        await self.bus.kv_delete(key)

    async def _free(self, keys: list[str]) -> list[str]:
        """The slots that are free now, in random order: empty ones, and those reclaimed
        because their job has an outcome or their lease expired (read all at once)."""
        raws = await asyncio.gather(*(self.bus.kv_get(k) for k in keys))
        now = time.time()
        leases = [None if raw is None else _decode(raw) for raw in raws]
        live = [i for i, le in enumerate(leases) if le is not None and le.expires_at > now and le.job_id]
        done = await asyncio.gather(*(self.finished(leases[i].job_id) for i in live))  # type: ignore[union-attr]
        stale = {i for i, le in enumerate(leases) if le is not None} - {i for i, d in zip(live, done, strict=True) if not d}
        free = [keys[i] for i, le in enumerate(leases) if le is None]
        for i in stale:
            raw = raws[i]
            assert raw is not None
            # only the submitter that marks this lease freed deletes it (never a newer lease)
            if await self.bus.kv_create(f"{keys[i]}.freed.{hashlib.sha256(raw).hexdigest()[:32]}", b""):
                await self.bus.kv_delete(keys[i])
            free.append(keys[i])
        random.shuffle(free)
        return free


def _decode(raw: bytes) -> _Lease:
    try:
        return _lease_dec.decode(raw)
    except msgspec.DecodeError:
        return _Lease("", 0.0)  # unreadable: treat as expired
