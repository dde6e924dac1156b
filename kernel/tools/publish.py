"""``aiwfe publish``: submit a job or make an RPC from the shell, as an external JSON publisher."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import msgspec

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, H_MSG_ID, JSON

__all__ = ["publish"]


async def _connect(url: str, prefix: str, name: str) -> Any:
    """A started NatsBus, or None after printing why it could not connect.

    Credentials and TLS: the URL's userinfo and the ``NATS_*`` environment variables
    (:func:`aiwfe.kernel.tools.connect.nats_connect_options`; raises ConfigError).
    """
    from aiwfe.bus.errors import BusError
    from aiwfe.bus.nats import NatsBus

    from .connect import nats_connect_options

    bus = NatsBus(url, prefix, name=name, connect_timeout_s=5.0, connect_options=nats_connect_options())
    try:
        await bus.start()
    except BusError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return bus


async def publish(url: str, subject: str, payload: Any, *, wait: bool, timeout_s: float, prefix: str = "aiwfe") -> int:
    """Publish ``payload`` as JSON. Jobs (``<prefix>.jobs.*``) print ``{"job_id"}`` and,
    with ``wait``, the job's record; RPCs print the reply. Returns the exit status.
    """
    from aiwfe.bus.errors import BusError, BusTimeout
    from aiwfe.kernel.errors import AiwfeError, DeadlineExceeded, Unavailable, from_wire
    from aiwfe.kernel.jobs import Jobs

    bus = await _connect(url, prefix, "aiwfe-publish")
    if bus is None:
        return 1
    jobs = Jobs(bus)
    try:
        data = json.dumps(payload).encode()
        headers = {H_CONTENT_TYPE: JSON}
        jobs_prefix = f"{prefix}.jobs."
        if subject.startswith(jobs_prefix):
            kind = subject[len(jobs_prefix) :]
            job_id = uuid.uuid4().hex
            headers[H_MSG_ID] = job_id
            await jobs.submit(kind, data, headers, job_id)
            print(json.dumps({"job_id": job_id}))
            if not wait:
                return 0
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout_s
            while (rec := await jobs.record(job_id)) is None:
                if loop.time() > end:
                    print(f"error: job {job_id} not finished after {timeout_s} s", file=sys.stderr)
                    return 1
                await asyncio.sleep(0.1)
            out = {"job_id": job_id, "status": rec.status, "attempts": rec.attempts}
            if rec.status == "done":
                out["result"] = rec.decoded()
            else:
                out["error"] = rec.error
            print(json.dumps(out))
            return 0 if rec.status == "done" else 1
        try:
            reply, rh = await bus.request(subject, data, headers, timeout_s)
        except BusTimeout as e:
            raise DeadlineExceeded(str(e)) from None
        except BusError as e:
            raise Unavailable(str(e)) from None
        if rh and H_ERROR in rh:
            err = from_wire(rh[H_ERROR])
            print(json.dumps({"error": {"code": err.code, "message": str(err), "retryable": err.retryable}}))
            return 1
        print(reply.decode())
        return 0
    except AiwfeError as e:
        print(json.dumps({"error": {"code": e.code, "message": str(e), "retryable": e.retryable}}))
        return 1
    finally:
        await bus.close()


async def dead_letters(url: str, prefix: str, action: str, *, kind: str | None, job_id: str | None) -> int:
    """``aiwfe dlq list|replay``: print dead letters (one JSON object per line) or re-queue them.

    Returns the exit status (1 when NATS cannot be reached).
    """
    from aiwfe.bus.codec import H_ATTEMPTS, H_JOB_ID, H_REASON
    from aiwfe.kernel import admin
    from aiwfe.kernel.jobs import Jobs

    bus = await _connect(url, prefix, "aiwfe-dlq")
    if bus is None:
        return 1
    jobs = Jobs(bus)
    try:
        if action == "replay":
            ids = await admin.replay_dead_letters(jobs, kind, job_id)
            print(json.dumps({"replayed": ids}))
            return 0
        for data, headers in await admin.dead_letters(jobs, kind):
            if job_id is not None and headers.get(H_JOB_ID) != job_id:
                continue
            try:
                payload = msgspec.msgpack.decode(data) if headers.get(H_CONTENT_TYPE) != JSON else json.loads(data)
            except (msgspec.DecodeError, ValueError):
                payload = data.decode(errors="replace")
            reason = json.loads(headers.get(H_REASON, "{}"))
            print(
                json.dumps(
                    {
                        "job_id": headers.get(H_JOB_ID),
                        "attempts": int(headers.get(H_ATTEMPTS, "0")),
                        "reason": reason,
                        "payload": payload,
                    },
                    default=str,
                )
            )
        return 0
    finally:
        await bus.close()
