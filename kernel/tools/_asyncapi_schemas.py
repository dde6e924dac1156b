"""Payload and header schemas of the kernel's own subjects for the AsyncAPI document
(:mod:`aiwfe.kernel.tools.asyncapi`): submit replies, the status subject, the kernel's job
events, the error header, and every header the kernel reads or writes.
"""

from __future__ import annotations

from typing import Any

import msgspec

# The status subject's schemas are the ones its pods decode and encode with.
from aiwfe.kernel.job_status import StatusReply, StatusRequest

__all__ = [
    "HEADERS",
    "ErrorInfo",
    "JobReplayed",
    "JobRetrying",
    "StatusReply",
    "StatusRequest",
    "SubmitAccepted",
]

JSON = "application/json"


# -- the kernel's own message types on the submit, status and job event subjects ----------


class SubmitAccepted(msgspec.Struct, frozen=True):
    """Reply of ``<prefix>.submit.<kind>``: the id of the accepted job."""

    job_id: str


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """An error as it travels: ``Aiwfe-Error`` header, dead-letter reason, failed job outcome."""

    type: str
    message: str
    retryable: bool = False
    retry_after_s: float | None = None


class JobRetrying(msgspec.Struct, frozen=True):
    """``job.retrying``: attempt ``attempt`` failed with a retryable error; another follows."""

    attempt: int
    type: str
    message: str
    retryable: bool = True


class JobReplayed(msgspec.Struct, frozen=True):
    """``job.replayed``: the job was re-queued from the dead-letter stream (``aiwfe dlq replay``)."""

    from_dead_letter: int


# -- headers (NATS header values are strings) --------------------------------------------

HEADERS: dict[str, dict[str, Any]] = {
    "traceparent": {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "maxLength": 255,
        "description": "W3C trace context; the handler's span continues this trace (an invalid one is ignored).",
    },
    "Aiwfe-Deadline-Ms": {
        "type": "string",
        "pattern": "^[0-9]+(\\.[0-9]+)?$",
        "maxLength": 32,
        "description": "Time remaining in milliseconds (each hop recomputes it, so clock skew does not matter): "
        "a finite number > 0, capped at the handler's timeout_s; without it timeout_s applies. A malformed "
        "value is answered with BadMessage naming the header.",
    },
    "Aiwfe-Schema": {
        "type": "string",
        "pattern": "^[0-9a-f]{16}$",
        "description": "Schema hash of the contract (and its reply); a different one is answered with SchemaMismatch.",
    },
    "Content-Type": {
        "type": "string",
        "description": "`application/json` for a JSON body (answered in JSON); absent or `application/msgpack` "
        "(also `application/x-msgpack`, `application/vnd.msgpack`) for msgpack; any other type is refused with "
        "BadMessage.",
        "examples": [JSON, "application/msgpack"],
    },
    "Nats-Msg-Id": {
        "type": "string",
        "pattern": "^[A-Za-z0-9_-]{1,128}$",
        "description": "The job id (it names the job's event subject and outcome key): JetStream drops a "
        "duplicate within its dedupe window.",
    },
    "Aiwfe-Idempotency-Key": {
        "type": "string",
        "minLength": 1,
        "maxLength": 200,
        "description": "The same key gives the same job id (one job, also after it finished).",
    },
    "Aiwfe-Validate-Only": {
        "type": "string",
        "enum": ["1"],
        "description": 'Only validate the input against the job contract: the reply is `{"valid": true}` or an '
        "error naming the field; nothing is recorded or queued.",
    },
    "Aiwfe-Error": {
        "type": "string",
        "contentMediaType": JSON,
        "description": "Set on an error reply (the body is then empty): JSON "
        '`{"type", "message", "retryable", "retry_after_s"?}` (components/schemas/ErrorInfo); for a bad '
        "message the text names the field.",
        "examples": ['{"type":"Overloaded","message":"memory.recall: 64 running and 1024 queued; retry later","retryable":true}'],
    },
    "Aiwfe-Type": {
        "type": "string",
        "description": "The event's type: `job.done`, `job.failed`, ... or a plugin's event address.",
    },
}
