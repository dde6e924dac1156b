"""Operating a running system: pod status over the control plane, dead letters.

Not part of the kernel core: built on the bus roles and the kernel's job store, used by
pods (status answers), the gateway (``/v1/pods``) and ``aiwfe dlq``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import msgspec

from aiwfe.bus.base import Bus, Headers
from aiwfe.bus.codec import H_ATTEMPTS, H_JOB_ID, H_MSG_ID, H_REASON, is_job_id

from .jobs import EV_REPLAYED, Jobs

__all__ = ["answer_status", "cluster_status", "dead_letters", "replay_dead_letters"]


async def answer_status(bus: Bus, provider: Callable[[], dict[str, Any]]) -> None:
    """Answer every status request (``<prefix>.control.status``) with ``provider()`` as JSON."""

    async def on_request(data: bytes, headers: Headers | None) -> tuple[bytes, Headers | None]:
        return msgspec.json.encode(provider()), None

    await bus.serve(f"{bus.prefix}.control.status", on_request, queue=False)


async def cluster_status(bus: Bus, timeout_s: float = 0.5) -> list[dict[str, Any]]:
    """Ask every running pod for its status: ``{pod, plugins, ready, reasons, ops_url}``,
    collecting the answers that arrive within ``timeout_s``, sorted by pod name."""
    out = []
    for raw in await bus.request_many(f"{bus.prefix}.control.status", b"", timeout_s):
        with contextlib.suppress(msgspec.DecodeError):
            out.append(msgspec.json.decode(raw))
    return sorted(out, key=lambda s: str(s.get("pod")))


async def dead_letters(jobs: Jobs, kind: str | None = None) -> list[tuple[bytes, Headers]]:
    """Dead-lettered jobs (all kinds, or one): payload and headers, the reason included."""
    return [(m.data, m.headers) for m in await jobs.bus.read(f"{jobs.prefix}.dlq.{kind or '>'}")]


async def replay_dead_letters(
    jobs: Jobs, kind: str | None = None, job_id: str | None = None, *, last: int | None = None
) -> list[str]:
    """Re-queue dead-lettered jobs (all, one kind, or one job) under their own job ids
    (``last``: only among the newest ``last`` dead letters, a bounded read for the gateway).

    The failed record is removed first so the job runs again; the replay gets a fresh
    message id (the dedupe window would drop the old one) and a ``job.replayed`` event;
    the dead letter is deleted once re-queued. Returns the replayed job ids.
    """
    done: list[str] = []
    dlq = f"{jobs.prefix}.dlq."
    for m in await jobs.bus.read(f"{dlq}{kind or '>'}", last):
        jid = m.headers.get(H_JOB_ID, "")
        if not is_job_id(jid) or (job_id is not None and jid != job_id):  # never a wildcard key
            continue
        await jobs.bus.kv_delete(jid)
        fresh = {k: v for k, v in m.headers.items() if k not in (H_REASON, H_ATTEMPTS, H_MSG_ID)}
        await jobs.bus.enqueue(m.subject[len(dlq) :], m.data, fresh, f"{jid}.replay{m.seq}")
        await jobs.emit(jid, EV_REPLAYED, msgspec.msgpack.encode({"from_dead_letter": m.seq}))
        await jobs.bus.delete(m.subject, m.seq)
        done.append(jid)
    return done
