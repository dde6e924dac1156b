"""Wire format shared by every bus: header names, stream names, the RPC call preamble.

Pods talk msgpack. A message whose ``Content-Type`` is ``application/json`` is decoded
as JSON instead (external publishers), and its reply is JSON too (the kernel decides).
"""

from __future__ import annotations

import struct

__all__ = [
    "H_ATTEMPTS",
    "H_CONTENT_TYPE",
    "H_DEADLINE",
    "H_ERROR",
    "H_JOB_ID",
    "H_MSG_ID",
    "H_REASON",
    "H_SCHEMA",
    "H_TRACE",
    "H_TYPE",
    "JSON",
    "PREAMBLE_SIZE",
    "pack_call",
    "stream_names",
    "unpack_call",
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
H_JOB_ID = "Aiwfe-Job-Id"  # a job's id when it differs from its Nats-Msg-Id (dead letters, replays)
JSON = "application/json"


def stream_names(prefix: str) -> dict[str, str]:
    """Stream and bucket names for a subject prefix (``aiwfe`` → ``AIWFE_JOBS`` ...)."""
    p = prefix.upper().replace(".", "_").replace("-", "_")
    return {"jobs": f"{p}_JOBS", "events": f"{p}_EVENTS", "dlq": f"{p}_DLQ", "results": f"{p}_RESULTS"}


# -- the RPC preamble ----------------------------------------------------------------
#
# Kernel-to-kernel requests carry their call metadata (deadline, schema hash, traceparent,
# the caller's job id) in a binary preamble in front of the msgpack body instead of in NATS
# headers: 16 fixed bytes (magic, version, deadline in ms, 8-byte schema hash, the two
# lengths), then the traceparent and the job id. nats-py's header encoding and parsing cost
# ~30 % of request/reply throughput (`aiwfe bench rpc` measures both). The first byte 0xC1
# is never produced by msgpack and is not JSON, so a payload without a preamble (an
# external publisher's JSON or msgpack, described by headers) is recognised at once. Jobs
# and events keep NATS headers: JetStream needs Nats-Msg-Id, and neither is on the RPC hot
# path.

PREAMBLE_MAGIC = 0xC1
PREAMBLE_VERSION = 2
_PRE = struct.Struct("!BBI8sBB")
PREAMBLE_SIZE = _PRE.size


def pack_call(deadline_ms: int, schema: bytes, traceparent: str | None, body: bytes, job_id: str | None = None) -> bytes:
    """Prefix ``body`` with the call preamble.

    ``schema`` is the 8-byte raw schema hash; ``job_id`` names the job the caller runs
    inside (so the callee can add events to it: partial LLM output streams from any pod).
    """
    tp = traceparent.encode() if traceparent else b""
    jid = job_id.encode()[:255] if job_id else b""
    head = _PRE.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, min(max(deadline_ms, 0), 0xFFFFFFFF), schema, len(tp), len(jid))
    return head + tp + jid + body


def unpack_call(data: bytes) -> tuple[int, bytes, str | None, str | None, memoryview] | None:
    """Split a preambled request into (deadline_ms, schema, traceparent, job_id, body); None without one.

    Raises:
        ValueError: a preamble that is truncated or of an unknown version.
    """
    if not data or data[0] != PREAMBLE_MAGIC:
        return None
    if len(data) < PREAMBLE_SIZE:
        raise ValueError("truncated call preamble")
    _, version, deadline_ms, schema, tl, jl = _PRE.unpack_from(data)
    if version != PREAMBLE_VERSION:
        raise ValueError(f"call preamble version {version}; this pod speaks {PREAMBLE_VERSION}")
    tp_end = PREAMBLE_SIZE + tl
    end = tp_end + jl
    if len(data) < end:
        raise ValueError("truncated call preamble")
    tp = data[PREAMBLE_SIZE:tp_end].decode("ascii", "replace") if tl else None
    jid = data[tp_end:end].decode("ascii", "replace") if jl else None
    return deadline_ms, schema, tp, jid, memoryview(data)[end:]
