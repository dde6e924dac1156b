"""Validated job submission: the ``<prefix>.submit.<kind>`` subjects and the kernel's JSON path.

Bad input is refused where it enters, before anything is recorded or queued:

* ``<prefix>.submit.<kind>`` (request/reply) is served, in a queue group, by every pod that
  consumes ``kind``. The body is the job's input as JSON (``Content-Type:
  application/json``, or a body starting with ``{``) or msgpack. It is decoded against the
  job's contract; a body that does not fit is answered with an ``Aiwfe-Error`` header
  (``BadInput``, the message naming the field: ``Expected `int`, got `str` - at `$.n```).
  A job's ``owner`` field (the user it acts for, e.g. whose memories helios recalls; the
  gateway sets it to the caller) is set to :data:`SUBMITTED`: an external publisher acts
  as no user, whatever it sent. A valid job is re-encoded as msgpack, recorded as
  submitted (the owner entry :data:`SUBMITTED`, which makes it readable on
  ``<prefix>.status.job`` while pending) and queued; the reply is ``{"job_id": ...}``
  (JSON for a JSON request, msgpack otherwise).
  ``Aiwfe-Idempotency-Key`` (at most :data:`MAX_KEY_CHARS` characters) makes the id
  deterministic, in a namespace of its own (never another surface's job);
  ``Aiwfe-Validate-Only: 1`` only validates and answers ``{"valid": true}`` (with the
  contract's ``max_jobs_per_owner`` when it declares one: the gateway's pod counts by it).
* :meth:`Submissions.submit_json` (``Kernel.submit_json``, the gateway's path) checks the
  size, validates the JSON against the contract (in-process when the consumer runs in this
  pod, else with a validate-only request to the consumer's pod), records the owner and
  queues. When queueing fails, the owner entry this call made is removed again, so no
  job id is left looking pending.

Fair share (:mod:`~aiwfe.kernel.quotas`): decoding checks the server's caps on the
client's budgets (``BadInput`` naming field, value and cap), and a new job takes one of its
owner's slots before it is queued (``TooManyJobs``, on the bus ``Overloaded`` with
``retry_after_s``); jobs on the submit subjects share the owner ``~submit``'s pool.

Sizes: a job over the bus's limit (NATS ``max_payload`` from the server, headers included)
is refused with ``TooLarge`` before anything is recorded. The jobs stream takes only the
kinds the pods consume or declare in ``calls`` (:meth:`Submissions.start` adds this pod's),
so a job of any other kind is refused instead of being kept where no one takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from aiwfe.bus.base import Headers, message_size
from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, H_MSG_ID, H_SCHEMA, H_TRACE, JSON, valid_traceparent
from aiwfe.bus.errors import BusError, BusTimeout, NoResponders

from ._external import _JSON_HEADERS, SUBMITTED, error_reply, is_json, reply
from .contract import address_of, kind_of
from .errors import AiwfeError, BadInput, BadMessage, DeadlineExceeded, Forbidden, Overloaded, TooLarge, Unavailable, from_wire
from .job_status import JobStatus
from .jobs import _unavailable
from .limiter import Limiter
from .quotas import JobQuotas, TooManyJobs, caps_of, check_caps
from .serving import Endpoint, _trace

__all__ = ["H_IDEMPOTENCY", "H_VALIDATE_ONLY", "MAX_KEY_CHARS", "OWNER_FIELD", "Submissions"]

H_IDEMPOTENCY = "Aiwfe-Idempotency-Key"
H_VALIDATE_ONLY = "Aiwfe-Validate-Only"
MAX_KEY_CHARS = 200
#: The job field naming the user a job acts for: set by the edge, never by the client.
OWNER_FIELD = "owner"
#: Room left for the headers the kernel adds on the way to the stream (traceparent, ...).
HEADROOM_BYTES = 256
VALIDATE_TIMEOUT_S = 5.0
HANDLE_TIMEOUT_S = 15.0

_enc = msgspec.msgpack.Encoder()
log = logging.getLogger("aiwfe.jobs")


def _wide_int(value: Any, path: str) -> str:
    """Where in ``value`` (builtins) an integer lies outside msgpack's −2^63..2^64−1."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{where}.{str(k)[:40]}", item) for k, item in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(v))))
        elif isinstance(v, int) and not -(2**63) <= v <= 2**64 - 1:
            return f"{where}: integers must be from -2^63 to 2^64-1"
    return f"{path}: an integer does not fit 64 bits"


@functools.cache
def _owner_field(contract: type) -> str | None:
    """``"str"`` when the contract has a plain ``owner: str`` (set by the edge), ``"other"``
    for an ``owner`` field of any other type (such a job cannot be submitted from outside:
    the edge could not neutralise it), None without one."""
    for f in msgspec.structs.fields(contract):
        if f.name == OWNER_FIELD:
            return "str" if f.type is str else "other"
    return None


class _Validated(msgspec.Struct):
    max_jobs_per_owner: int | None = None


_validated_dec = msgspec.json.Decoder(_Validated)


def _declared(contract: type) -> int | None:
    value = getattr(contract, "max_jobs_per_owner", None)
    return value if isinstance(value, int) else None


class Submissions:
    """One pod's submit subjects and validated submission (see the module docstring).

    ``kernel`` is the pod's :class:`~aiwfe.kernel.routing.Kernel` (its bus, jobs, job
    endpoints and submit path).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.bus = kernel.bus
        self.declared: set[str] = set()
        self.limiter = Limiter("submit", 256, 1024)
        self.quotas = JobQuotas(self.bus, self._finished)  # the pod sets ``quotas.limits`` from the manifest
        self._caps: dict[str, dict[str, float | str]] = {}

    async def _finished(self, job_id: str) -> bool:
        return await self.kernel.jobs.record(job_id) is not None

    def declare(self, contracts: Iterable[type]) -> None:
        """Note the job contracts a plugin of this pod submits (they join the stream's kinds)."""
        self.declared.update(address_of(c) for c in contracts if kind_of(c) == "job")

    def _endpoints(self) -> dict[str, Endpoint]:
        return {ep.spec.address: ep for ep in self.kernel.job_endpoints.values()}

    async def start(self) -> None:
        """Add this pod's kinds to the jobs stream, serve the submit subjects and the status
        subject (before the consumers start: a consumer's kind must be a stream subject)."""
        eps = self._endpoints()
        for address, ep in eps.items():  # a cap naming no field is a manifest error, found at start
            self._caps[address] = caps_of(ep.contract, self.quotas.of(address))
        with _unavailable():
            await self.bus.accept_kinds(sorted(set(eps) | self.declared))
        for address, ep in eps.items():
            await self.bus.serve(f"{self.bus.prefix}.submit.{address}", self._handler(ep))
        self.status = JobStatus(self.kernel.jobs)
        await self.status.start()

    # -- checks ------------------------------------------------------------------------

    def check_size(self, address: str, data: bytes, headers: Headers) -> None:
        """Raise TooLarge when the job would not fit in one bus message."""
        size, limit = message_size(data, headers) + HEADROOM_BYTES, self.bus.max_payload()
        if size > limit:
            raise TooLarge(f"job {address}: {size} bytes with its headers, over the bus's limit of {limit} (NATS max_payload)")

    def decode(self, ep: Endpoint, data: bytes, as_json: bool) -> Any:
        """Decode job input against ``ep``'s contract and check its caps
        (:mod:`~aiwfe.kernel.quotas`). Raises BadInput naming the field (and the cap)."""
        try:
            job = ep.decode(data, _JSON_HEADERS if as_json else None)[0]
        except BadMessage as e:
            raise BadInput(e.message) from None
        try:  # JSON integers have no bound; the bus's msgpack carries 64 bits (a job would fail later)
            _enc.encode(job)
        except OverflowError:
            raise BadInput(f"{ep.spec.address}: {_wide_int(msgspec.to_builtins(job), 'input')}") from None
        address = ep.spec.address
        caps = self._caps.get(address)
        if caps is None:
            caps = self._caps[address] = caps_of(ep.contract, self.quotas.of(address))
        check_caps(address, job, caps)
        return job

    async def validate(self, address: str, data: bytes) -> int | None:
        """Validate JSON input of job ``address`` against its contract, in-process when this
        pod consumes it, else by the consumer's pod (a validate-only submit request); return
        the contract's ``max_jobs_per_owner`` (None when it declares none).

        Raises:
            BadInput, TooLarge, Unavailable (no pod consumes ``address`` now), DeadlineExceeded.
        """
        ep = self._endpoints().get(address)
        if ep is not None:
            self.decode(ep, data, True)
            return _declared(ep.contract)
        subject = f"{self.bus.prefix}.submit.{address}"
        try:
            body, rh = await self.bus.request(subject, data, {**_JSON_HEADERS, H_VALIDATE_ONLY: "1"}, VALIDATE_TIMEOUT_S)
        except NoResponders:
            kinds = ", ".join(await self._kinds()) or "none"
            raise Unavailable(f"no pod consumes job kind {address} now (kinds the jobs stream takes: {kinds})") from None
        except BusTimeout as e:
            raise DeadlineExceeded(f"validating {address}: {e}") from None
        except BusError as e:
            raise Unavailable(f"validating {address}: {e}") from None
        if rh and H_ERROR in rh:
            raise from_wire(rh[H_ERROR])
        try:
            return _validated_dec.decode(body).max_jobs_per_owner
        except msgspec.DecodeError:
            return None  # a pod of an older version: the default limit

    async def _kinds(self) -> list[str]:
        with contextlib.suppress(Exception):
            return list(await self.bus.job_kinds())
        return []

    # -- submitting --------------------------------------------------------------------

    async def submit_json(
        self, address: str, data: bytes, job_id: str | None, idempotency_key: str | None, owner: str | None
    ) -> str:
        """``Kernel.submit_json``: size, validation, owner, queue (see the module docstring).

        Raises:
            TooLarge, BadInput, Forbidden, TooManyJobs, Unavailable, DeadlineExceeded.
        """
        job_id = self.kernel._job_id(address, job_id, idempotency_key)
        headers = {H_MSG_ID: job_id, H_CONTENT_TYPE: JSON}
        self.check_size(address, data, headers)
        declared = await self.validate(address, data)
        await self.enqueue(address, data, headers, job_id, owner, self.quotas.hold_s(address, data=data), declared)
        return job_id

    async def enqueue(
        self,
        address: str,
        data: bytes,
        headers: Headers,
        job_id: str,
        owner: str | None,
        hold_s: float | None = None,
        declared: int | None = None,
    ) -> None:
        """Record ``owner`` (unless the job has one: then it must be the same), take one of the
        owner's job slots for ``hold_s`` seconds when the job is new (``hold_s`` None: no slot;
        ``declared``: the contract's ``max_jobs_per_owner``) and queue the job; when queueing
        was refused, give back what this call took and re-raise. When it was not confirmed
        (``DeadlineExceeded``) or the caller was cancelled while queueing, the job may be queued:
        its owner entry and slot stay (a job without its owner would answer 404 to that owner). A
        caller cancelled before queueing gives both back (the slot was held until its lease ended).

        Raises:
            TooLarge, Forbidden, TooManyJobs, Unavailable, DeadlineExceeded.
        """
        self.check_size(address, data, headers)
        created, key, slot = False, f"owner.{job_id}", None
        if owner is not None:
            with _unavailable():
                created = await self.bus.kv_create(key, owner.encode())
            if not created and await self.kernel.jobs.owner(job_id) != owner:
                raise Forbidden(f"job {job_id} belongs to someone else")
        queueing = False
        try:
            if created and owner is not None and hold_s is not None:  # a resubmission holds its first slot
                with _unavailable():
                    slot = await self.quotas.acquire(
                        address, owner, job_id, hold_s, submitted=owner == SUBMITTED, declared=declared
                    )
            queueing = True
            await self.kernel._submit(address, data, headers, job_id)
        except BaseException as e:
            if queueing and isinstance(e, (DeadlineExceeded, asyncio.CancelledError)):
                raise  # not confirmed, or the caller left while queueing: the job may be queued, its owner and slot stay
            with contextlib.suppress(Exception):
                if slot is not None:
                    await self.quotas.release(slot)
                if created:
                    await self.bus.kv_delete(key)
            raise

    def _handler(self, ep: Endpoint) -> Any:
        address = ep.spec.address

        async def handle(data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
            as_json = is_json(data, headers)
            h = headers or {}
            tp = valid_traceparent(h.get(H_TRACE))  # W3C or ignored, as on every subject
            token = _trace.set(tp) if tp else None
            try:
                await self.limiter.enter()
                try:
                    async with asyncio.timeout(HANDLE_TIMEOUT_S):
                        return reply(await self._submit_one(ep, address, data, h, as_json), as_json)
                except TimeoutError:
                    raise DeadlineExceeded(f"submitting {address}: no answer within {HANDLE_TIMEOUT_S} s") from None
                finally:
                    self.limiter.leave()
            except TooManyJobs as e:  # on the bus: the known retryable type, with its hint
                return error_reply(Overloaded(e.message, retry_after_s=e.retry_after_s))
            except AiwfeError as e:
                return error_reply(e)
            except Exception as e:  # never a request without an answer
                log.exception("submit %s failed", address)
                return error_reply(Unavailable(f"submitting {address}: {type(e).__name__}"))
            finally:
                if token is not None:
                    _trace.reset(token)

        return handle

    async def _submit_one(self, ep: Endpoint, address: str, data: bytes, h: Headers, as_json: bool) -> dict[str, Any]:
        job = self.decode(ep, data, as_json)
        owner = _owner_field(ep.contract)
        if owner == "other":
            raise Forbidden(f"job {address} acts for a user (its {OWNER_FIELD} field): submit it through the gateway")
        if owner == "str":  # an external publisher acts as no user, whatever it sent
            job = msgspec.structs.replace(job, **{OWNER_FIELD: SUBMITTED})
        validate_only = h.get(H_VALIDATE_ONLY, "0").strip().lower()
        if validate_only not in ("0", "1", "false", "true"):
            raise BadInput(f"{H_VALIDATE_ONLY}: 1/true or 0/false, got {validate_only[:20]!r}")
        if validate_only in ("1", "true"):  # the gateway's pod learns the contract's slot limit here
            declared = _declared(ep.contract)
            return {"valid": True} if declared is None else {"valid": True, "max_jobs_per_owner": declared}
        key = h.get(H_IDEMPOTENCY)
        if key is not None and not 0 < len(key) <= MAX_KEY_CHARS:
            raise BadInput(f"{H_IDEMPOTENCY}: 1 to {MAX_KEY_CHARS} characters, got {len(key)}")
        job_id = self.kernel._job_id(address, None, f"submit:{key}" if key else None)
        headers: Headers = {H_MSG_ID: job_id, H_SCHEMA: ep.schema}
        await self.enqueue(address, _enc.encode(job), headers, job_id, SUBMITTED, self.quotas.hold_s(address, job=job))
        return {"job_id": job_id}
