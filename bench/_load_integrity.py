"""Data integrity after a load run: the client's log, the job stream and the database reconciled.

For every job the client got ``202`` for: exactly one outcome record in the results KV bucket
(``<PREFIX>_RESULTS``, create-only), exactly one terminal event (``job.done`` / ``job.failed``)
on the events stream, and for a job that succeeded exactly one row in ``helios_runs``. For
every job whose submit was answered ``503``: no record, no event, no row.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from aiwfe.kernel.jobs import Jobs

__all__ = ["reconcile"]

_TERMINAL = ("job.done", "job.failed", "job.cancelled")


async def _wait_records(bus: Any, job_ids: list[str], settle_s: float) -> dict[str, Any]:
    """Poll the results bucket until every job has a record or ``settle_s`` passed."""
    records: dict[str, Any] = {}
    end = time.monotonic() + settle_s
    pending = list(job_ids)
    while pending:
        got = await asyncio.gather(*(Jobs(bus).record(j) for j in pending))
        for j, rec in zip(pending, got, strict=True):
            if rec is not None:
                records[j] = rec
        pending = [j for j in pending if j not in records]
        if not pending or time.monotonic() > end:
            break
        await asyncio.sleep(1.0)
    return records


async def _terminal_events(bus: Any) -> Counter[str]:
    """Job id → number of terminal events on the events stream (read once, all subjects)."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    counts: Counter[str] = Counter()
    sub = await bus.js.pull_subscribe(
        f"{bus.prefix}.events.>",
        stream=bus.names["events"],
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30.0),
    )
    try:
        while True:
            try:
                msgs = await sub.fetch(1000, timeout=2.0)
            except TimeoutError:
                break
            for m in msgs:
                if (m.headers or {}).get("Aiwfe-Type", "") in _TERMINAL:
                    counts[m.subject.rsplit(".", 1)[1]] += 1
            if msgs and msgs[-1].metadata.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    return counts


def _rows(database_url: str, job_ids: list[str]) -> Counter[str]:
    """Job id → rows in ``helios_runs`` (0 when the table does not exist)."""
    import psycopg

    if not database_url or not job_ids:
        return Counter()
    with psycopg.connect(database_url, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('helios_runs')").fetchone()
        if not exists or exists[0] is None:
            return Counter()
        cur = conn.execute("SELECT job_id, count(*) FROM helios_runs WHERE job_id = ANY(%s) GROUP BY job_id", (job_ids,))
        return Counter({str(j): int(n) for j, n in cur.fetchall()})


async def reconcile(
    nats_url: str, prefix: str, database_url: str, accepted: list[str], refused: list[str], settle_s: float
) -> dict[str, Any]:
    """Reconcile the client's log with the results bucket, the events stream and PostgreSQL.

    Accepts the NATS URL and subject prefix of the system, its database URL (empty: rows are
    not checked), the job ids answered 202 and those answered 503, and how long to wait for
    outstanding jobs to finish. Returns ``integrity_pct`` (accepted jobs whose record, event
    and row counts are all right, in %), ``jobs_done``, ``jobs_failed``, ``jobs_missing``
    (no record after ``settle_s``), ``duplicate_events``, ``missing_rows``,
    ``refused_but_present`` (503'd jobs found anywhere) and ``settle_s`` (time waited).
    """
    from aiwfe.bus.nats import NatsBus

    bus = NatsBus(nats_url, prefix, name="loadtest-reconcile")
    await bus.start()
    t0 = time.monotonic()
    try:
        records = await _wait_records(bus, accepted, settle_s)
        waited = time.monotonic() - t0
        refused_records = [
            j for j, r in zip(refused, await asyncio.gather(*(Jobs(bus).record(j) for j in refused)), strict=True) if r
        ]
        events = await _terminal_events(bus)
    finally:
        await bus.close()
    done = [j for j, r in records.items() if r.status == "done"]
    rows = await asyncio.to_thread(_rows, database_url, accepted + refused)
    good = 0
    missing_rows = 0
    duplicate_events = 0
    for j in accepted:
        rec = records.get(j)
        ok = rec is not None and events[j] == 1
        duplicate_events += max(0, events[j] - 1)
        if rec is not None and rec.status == "done" and database_url:
            if rows[j] != 1:
                missing_rows += 1
                ok = False
        good += ok
    refused_present = {j for j in refused if events[j] or rows[j]} | set(refused_records)
    checked = len(accepted) + len(refused)
    good_refused = len(refused) - len(refused_present)
    return {
        "integrity_pct": round(100.0 * (good + good_refused) / checked, 3) if checked else 100.0,
        "jobs_accepted": len(accepted),
        "jobs_done": len(done),
        "jobs_failed": len(records) - len(done),
        "jobs_missing": len(accepted) - len(records),
        "duplicate_events": duplicate_events,
        "missing_rows": missing_rows,
        "jobs_refused": len(refused),
        "refused_but_present": len(refused_present),
        "rows_checked": bool(database_url),
        "settle_s": round(waited, 1),
    }
