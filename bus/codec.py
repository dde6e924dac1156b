"""Wire format shared by every bus: header names, stream names, the RPC call preamble, and
the checks of every header and preamble field (metadata is untrusted input).

Pods talk msgpack. A message whose ``Content-Type`` is ``application/json`` is decoded
as JSON instead (external publishers), and its reply is JSON too (the kernel decides).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Mapping

__all__ = [
    "ALIVE_TOKEN",
    "HEARTBEAT_S",
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
    "LIVENESS_WINDOW_S",
    "LIVE_MARK",
    "MAX_JOB_ID_LEN",
    "MAX_TRACEPARENT_LEN",
    "PREAMBLE_SIZE",
    "BadField",
    "check_job_id",
    "check_schema",
    "is_job_id",
    "is_json",
    "is_reply_inbox",
    "pack_call",
    "parse_deadline_ms",
    "read_headers",
    "show",
    "stream_names",
    "unpack_call",
    "valid_traceparent",
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

# Liveness of calls (aiwfe.bus.nats): a caller that follows heartbeats marks its reply token
# (the inbox's last token) with LIVE_MARK, a character no nats-py, nats.go or nats.js token
# holds; every HEARTBEAT_S the serving pod publishes, to ``<caller's inbox>.<ALIVE_TOKEN>``,
# the tokens of those marked calls that have run for HEARTBEAT_S or more (any other caller's
# request mux drops a token it does not know). A marked call heard of neither by reply nor
# by heartbeat for LIVENESS_WINDOW_S fails with CalleeLost.
LIVE_MARK = "~"
ALIVE_TOKEN = "_alive"
HEARTBEAT_S = 0.5
LIVENESS_WINDOW_S = 2.0


# -- metadata is untrusted input ----------------------------------------------------------
#
# Every header and preamble field the kernel reads is checked here, before a message takes
# a concurrency slot: a malformed value raises BadField (the serving side answers BadMessage
# naming the field), an invalid traceparent is ignored (W3C Trace Context: start a new trace).
# Values echoed into error messages are cut short (:func:`show`).

MAX_JOB_ID_LEN = 128
MAX_TRACEPARENT_LEN = 255  # the preamble's length byte; version 00 is exactly 55
_MAX_DEADLINE_TEXT = 32
# Job ids become NATS subject tokens (``<prefix>.events.<job_id>``) and KV keys: no ``.``,
# ``*``, ``>``, whitespace or control characters, nothing a KV key refuses.
_JOB_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_JOB_ID_LEN}}}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[\x21-\x7e]*)?")
_SCHEMA = re.compile(r"[0-9a-f]{16}")
# The preamble's fields are checked as bytes (the common traceparent, version 00, at once).
_JOB_ID_B = re.compile(rb"[A-Za-z0-9_-]{1,%d}" % MAX_JOB_ID_LEN)
_TP00_B = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZEROS = b"0" * 32
_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})


class BadField(ValueError):
    """A header or preamble field that is malformed or out of bounds; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def show(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut to about ``limit`` characters (for echoing untrusted values)."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "...'"


def parse_deadline_ms(text: str, field: str = H_DEADLINE) -> float:
    """Parse a deadline header (time remaining in ms): a finite decimal number > 0.

    Raises:
        BadField: not a number, not finite, zero or negative, or longer than 32 characters.
    """
    if len(text) > _MAX_DEADLINE_TEXT:
        raise BadField(field, f"{show(text)} is too long for a deadline in ms")
    try:
        ms = float(text)
    except ValueError:
        raise BadField(field, f"{show(text)} is not a number of milliseconds") from None
    if not math.isfinite(ms) or ms <= 0:
        raise BadField(field, f"{show(text)}: the time remaining must be a finite number of ms > 0")
    return ms


def valid_traceparent(tp: str | None) -> str | None:
    """``tp`` when it is a valid W3C traceparent (at most 255 characters), else None."""
    if not tp or len(tp) > MAX_TRACEPARENT_LEN:
        return None
    m = _TRACEPARENT.fullmatch(tp)
    if m is None:
        return None
    version, trace_id, parent_id, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or not trace_id.strip("0") or not parent_id.strip("0"):
        return None
    return tp


def is_reply_inbox(subject: str) -> bool:
    """True for a reply subject a pod may answer on: an inbox (``_INBOX.`` and at least one
    more token, none empty, no wildcard).

    NATS does not check a requester's reply subject against the requester's permissions,
    but the answer is published with the *server's*: a reply subject such as
    ``$KV.<bucket>.<job id>`` or ``$JS.API.CONSUMER.DELETE...`` would make a pod write
    where only pods may. Every user's inbox is ``_INBOX.<user>...``
    (:mod:`aiwfe.kernel.tools.natsauth`), so nothing legitimate is refused.
    """
    if not subject.startswith("_INBOX.") or len(subject) > 255:
        return False
    return all(t and t not in ("*", ">") and t.isprintable() and " " not in t for t in subject.split("."))


def is_job_id(job_id: object) -> bool:
    """True for a usable job id: 1 to 128 of ``A-Z a-z 0-9 _ -``."""
    return isinstance(job_id, str) and _JOB_ID.fullmatch(job_id) is not None


def check_job_id(job_id: str, field: str = "job_id") -> str:
    """Return ``job_id`` if usable (:func:`is_job_id`).

    Raises:
        BadField: anything else.
    """
    if not is_job_id(job_id):
        raise BadField(field, f"{show(job_id)} is not a job id (1 to {MAX_JOB_ID_LEN} of A-Z a-z 0-9 _ -)")
    return job_id


def check_schema(value: str) -> str:
    """Return an ``Aiwfe-Schema`` value if it is a schema hash (16 lowercase hex digits).

    Raises:
        BadField: anything else.
    """
    if len(value) != 16 or _SCHEMA.fullmatch(value) is None:
        raise BadField(H_SCHEMA, f"{show(value)} is not a schema hash (16 hex digits)")
    return value


def is_json(content_type: str | None) -> bool:
    """True for ``application/json`` (any case, parameters allowed); False for no type or msgpack.

    Raises:
        BadField: any other Content-Type.
    """
    if content_type is None or content_type == JSON:
        return content_type is not None
    media = content_type.split(";", 1)[0].strip().lower()
    if media == JSON:
        return True
    if media in _MSGPACK_TYPES or not media:
        return False
    raise BadField(H_CONTENT_TYPE, f"{show(content_type)} is not supported; send {JSON} or application/msgpack")


def read_headers(headers: Mapping[str, str] | None) -> tuple[float | None, str | None, bool, str | None]:
    """The call metadata of a message described by headers, each field checked as above:
    ``(deadline_ms, traceparent, is_json, schema)``; None where absent (or, for the
    traceparent, invalid).

    Raises:
        BadField: a malformed ``Aiwfe-Deadline-Ms``, ``Content-Type`` or ``Aiwfe-Schema``.
    """
    if not headers:
        return None, None, False, None
    d, schema = headers.get(H_DEADLINE), headers.get(H_SCHEMA)
    return (
        None if d is None else parse_deadline_ms(d),
        valid_traceparent(headers.get(H_TRACE)),
        is_json(headers.get(H_CONTENT_TYPE)),
        None if schema is None else check_schema(schema),
    )


def stream_names(prefix: str) -> dict[str, str]:
    """Stream and bucket names for a subject prefix (``aiwfe`` → ``AIWFE_JOBS`` ...)."""
    p = prefix.upper().replace(".", "_").replace("-", "_")
    return {"jobs": f"{p}_JOBS", "events": f"{p}_EVENTS", "dlq": f"{p}_DLQ", "results": f"{p}_RESULTS"}


# -- the RPC preamble ----------------------------------------------------------------
#
# Kernel-to-kernel requests carry their call metadata (deadline, schema hash, traceparent,
# the caller's job id and its owner) in a binary preamble in front of the msgpack body
# instead of in NATS headers: 17 fixed bytes (magic, version, deadline in ms, 8-byte schema
# hash, the three lengths), then the traceparent, the job id and the owner. nats-py's header
# encoding and parsing cost ~30 % of request/reply throughput (`aiwfe bench rpc` measures
# both). The first byte 0xC1 is never produced by msgpack and is not JSON, so a payload
# without a preamble (an external publisher's JSON or msgpack, described by headers) is
# recognised at once. Jobs and events keep NATS headers: JetStream needs Nats-Msg-Id, and
# neither is on the RPC hot path.

PREAMBLE_MAGIC = 0xC1
PREAMBLE_VERSION = 3  # 3: the owner of the caller's job (fair queueing)
_PRE = struct.Struct("!BBI8sBBB")
PREAMBLE_SIZE = _PRE.size
MAX_OWNER_LEN = 128
_OWNER_B = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_OWNER_LEN)


def owner_key(owner: str) -> bytes:
    """``owner`` as the preamble carries it: itself when it is 1 to 128 printable ASCII
    characters, else a digest of it (a stable key of the same owner)."""
    raw = owner.encode()
    if _OWNER_B.fullmatch(raw):
        return raw
    return b"#" + hashlib.blake2b(raw, digest_size=16).hexdigest().encode()


def pack_call(
    deadline_ms: int, schema: bytes, traceparent: str | None, body: bytes, job_id: str | None = None, owner: str | None = None
) -> bytes:
    """Prefix ``body`` with the call preamble.

    ``schema`` is the 8-byte raw schema hash; ``job_id`` names the job the caller runs
    inside (so the callee can add events to it: partial LLM output streams from any pod);
    ``owner`` is whom the call acts for (:func:`owner_key`; the callee's queues are fair
    between owners).
    """
    tp = traceparent.encode() if traceparent and len(traceparent) <= MAX_TRACEPARENT_LEN else b""
    jid = job_id.encode() if job_id and len(job_id) <= MAX_JOB_ID_LEN else b""
    own = owner_key(owner) if owner else b""
    # A call with less than 1 ms left still has time left: 0 is refused as malformed.
    deadline_ms = min(max(deadline_ms, 1), 0xFFFFFFFF)
    head = _PRE.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, deadline_ms, schema, len(tp), len(jid), len(own))
    return head + tp + jid + own + body


def unpack_call(data: bytes) -> tuple[int, bytes, str | None, str | None, str | None, memoryview] | None:
    """Split a preambled request into (deadline_ms, schema, traceparent, job_id, owner,
    body); None without one.

    The deadline is > 0; an invalid traceparent comes back as None (ignored).

    Raises:
        BadField: a preamble that is truncated or of an unknown version, a deadline of 0,
        a job id that is not one (:func:`is_job_id`), an owner that is not 1 to 128
        printable ASCII characters.
    """
    if not data or data[0] != PREAMBLE_MAGIC:
        return None
    if len(data) < PREAMBLE_SIZE:
        raise BadField("call preamble", f"truncated ({len(data)} bytes, the fixed part is {PREAMBLE_SIZE})")
    _, version, deadline_ms, schema, tl, jl, ol = _PRE.unpack_from(data)
    if version != PREAMBLE_VERSION:
        raise BadField("call preamble", f"version {version}; this pod speaks {PREAMBLE_VERSION}")
    if deadline_ms == 0:
        raise BadField("call preamble deadline", "0 ms: the time remaining must be > 0")
    tp_end = PREAMBLE_SIZE + tl
    jid_end = tp_end + jl
    end = jid_end + ol
    if len(data) < end:
        raise BadField("call preamble", f"truncated (its lengths say {end} bytes, the message has {len(data)})")
    tp = jid = owner = None
    if ol:
        raw = data[jid_end:end]
        if _OWNER_B.fullmatch(raw) is None:
            raise BadField("call preamble owner", f"{show(raw)} is not an owner key (1 to {MAX_OWNER_LEN} printable ASCII)")
        owner = raw.decode()
    if tl:
        raw = data[PREAMBLE_SIZE:tp_end]
        if tl == 55 and _TP00_B.fullmatch(raw) and raw[3:35] != _ZEROS and raw[36:52] != _ZEROS[:16]:
            tp = raw.decode()
        else:
            tp = valid_traceparent(raw.decode("ascii", "replace"))
    if jl:
        raw = data[tp_end:jid_end]
        if _JOB_ID_B.fullmatch(raw) is None:
            raise BadField("call preamble job id", f"{show(raw)} is not a job id (1 to {MAX_JOB_ID_LEN} of A-Z a-z 0-9 _ -)")
        jid = raw.decode()
    return deadline_ms, schema, tp, jid, owner, memoryview(data)[end:]
