"""Wire format shared by every bus: header names, job records, helpers.

Pods talk msgpack. A message whose ``Content-Type`` is ``application/json`` is decoded
as JSON instead (external publishers), and its reply is JSON too.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

__all__ = [
    "H_DEADLINE",
    "H_SCHEMA",
    "H_ERROR",
    "H_TRACE",
    "H_MSG_ID",
    "H_TYPE",
    "H_CONTENT_TYPE",
    "H_REASON",
    "H_ATTEMPTS",
    "JSON",
    "JobRecord",
    "JobEvent",
    "encode_record",
    "decode_record",
    "stream_names",
]

H_DEADLINE = "Aiwfe-Deadline-Ms"  # time remaining, so clock skew between hosts does not matter
H_SCHEMA = "Aiwfe-Schema"
H_ERROR = "Aiwfe-Error"
H_TRACE = "traceparent"
H_MSG_ID = "Nats-Msg-Id"
H_TYPE = "Aiwfe-Type"
H_CONTENT_TYPE = "Content-Type"
H_REASON = "Aiwfe-Reason"
H_ATTEMPTS = "Aiwfe-Attempts"
JSON = "application/json"


class JobRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The one stored outcome of a job (written once, whatever the redeliveries).

    ``status`` is ``done`` or ``failed``; ``result`` is the msgpack-encoded result Struct;
    ``error`` is the wire error (``type``, ``message``, ``retryable``) of a failed job.
    """

    job_id: str
    kind: str
    status: str
    result: bytes = b""
    error: dict[str, Any] | None = None
    attempts: int = 1
    finished_at: float = msgspec.field(default_factory=time.time)


class JobEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a job as a reader sees it: stream sequence, type tag, decoded data."""

    seq: int
    job_id: str
    type: str
    data: Any


_rec_enc = msgspec.msgpack.Encoder()
_rec_dec = msgspec.msgpack.Decoder(JobRecord)


def encode_record(rec: JobRecord) -> bytes:
    """Encode a job record."""
    return _rec_enc.encode(rec)


def decode_record(raw: bytes) -> JobRecord:
    """Decode a job record.

    Raises:
        msgspec.DecodeError: not a job record.
    """
    return _rec_dec.decode(raw)


def stream_names(prefix: str) -> dict[str, str]:
    """Stream and bucket names for a subject prefix (``aiwfe`` → ``AIWFE_JOBS`` ...)."""
    p = prefix.upper().replace(".", "_").replace("-", "_")
    return {"jobs": f"{p}_JOBS", "events": f"{p}_EVENTS", "dlq": f"{p}_DLQ", "results": f"{p}_RESULTS"}
