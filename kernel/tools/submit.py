"""``aiwfe publish`` for jobs: submit through ``<prefix>.submit.<kind>`` (the consumer's pod
validates the input before anything is queued) and follow ``<prefix>.status.job`` — the
same subjects, and the same permissions, an external publisher has."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, JSON

__all__ = ["hint", "job_kind", "known_kinds", "print_error", "submit_job"]

_JH = {H_CONTENT_TYPE: JSON}


def job_kind(subject: str, prefix: str) -> str | None:
    """The job kind of ``<prefix>.submit.<kind>`` or ``<prefix>.jobs.<kind>``; None for other subjects."""
    for role in ("submit", "jobs"):
        head = f"{prefix}.{role}."
        if subject.startswith(head) and len(subject) > len(head):
            return subject[len(head) :]
    return None


def print_error(code: str, message: str, retryable: bool = False) -> int:
    """Print ``{"error": {code, message, retryable}}`` (stdout, like a reply); return exit status 1."""
    print(json.dumps({"error": {"code": code, "message": message, "retryable": retryable}}))
    return 1


async def known_kinds(bus: Any) -> str:
    """The job kinds the jobs stream takes, for hints ("" when they cannot be read)."""
    try:
        async with asyncio.timeout(3):
            return ", ".join(await bus.job_kinds()) or "none"
    except Exception:  # a user without JetStream access, or no server answer: no hint
        return ""


def hint(kinds: str) -> str:
    listed = f"known job kinds: {kinds}" if kinds else "the job kinds are in `aiwfe asyncapi MANIFEST`"
    return f"{listed} (submit one as <prefix>.submit.<kind> or <prefix>.jobs.<kind>)"


async def _request(bus: Any, subject: str, body: dict[str, Any], timeout_s: float) -> Any:
    """One JSON request; the decoded reply. Raises the reply's AiwfeError, or BusError."""
    from aiwfe.kernel.errors import from_wire

    reply, rh = await bus.request(subject, json.dumps(body).encode(), dict(_JH), timeout_s)
    if rh and H_ERROR in rh:
        raise from_wire(rh[H_ERROR])
    return json.loads(reply)


async def submit_job(bus: Any, prefix: str, kind: str, data: bytes, *, wait: bool, timeout_s: float) -> int:
    """Submit ``data`` (JSON) as a job of ``kind``; print ``{"job_id"}`` and, with ``wait``,
    ``{"job_id", "status", "result"|"error", "events"}`` once final. Returns the exit status
    (1 for an unknown kind — with the known ones —, bad input, an error, or a failed job)."""
    from aiwfe.bus.errors import BusError, BusTimeout, NoResponders
    from aiwfe.kernel.errors import AiwfeError

    subject = f"{prefix}.submit.{kind}"
    try:
        reply, rh = await bus.request(subject, data, dict(_JH), timeout_s)
        if rh and H_ERROR in rh:
            from aiwfe.kernel.errors import from_wire

            raise from_wire(rh[H_ERROR])
        job_id = json.loads(reply)["job_id"]
        print(json.dumps({"job_id": job_id}))
        if not wait:
            return 0
        loop = asyncio.get_running_loop()
        end, after, events = loop.time() + timeout_s, 0, 0
        while (left := end - loop.time()) > 0:
            poll_s = min(left, 25.0)
            s = await _request(bus, f"{prefix}.status.job", {"job_id": job_id, "after_seq": after, "wait_s": poll_s}, poll_s + 5)
            after, events = s["last_seq"], events + len(s["events"])
            if s["final"]:
                out = {"job_id": job_id, "status": s["status"], "events": events}
                out["result" if s["status"] == "done" else "error"] = s["result"] if s["status"] == "done" else s["error"]
                print(json.dumps(out))
                return 0 if s["status"] == "done" else 1
        print(f"error: job {job_id} not finished after {timeout_s} s", file=sys.stderr)
        return 1
    except NoResponders:
        return print_error("unknown_kind", f"no pod serves job kind {kind!r} ({subject}); {hint(await known_kinds(bus))}")
    except BusTimeout as e:
        return print_error("deadline_exceeded", str(e), True)
    except BusError as e:
        return print_error("unavailable", str(e), True)
    except AiwfeError as e:
        return print_error(e.code, str(e), e.retryable)
