"""Garbage-collector tuning of a ready pod.

A ready pod sets ``system.gc_thresholds`` (default ``50_000, 20, 100``)
and freezes the objects of its start (modules, plugin state) out of the collector's scans;
stopping restores the previous thresholds and unfreezes. Python's default (``700, 10, 10``)
made the gateway with 5,000 open WebSockets spend a third of its CPU in the collector,
with 32 full collections of ≈ 250 ms each in 25 s (each a stall of every socket), because
objects of calls in flight survive the young generations and push the full collection's
25 % rule (``aiwfe bench ws --connections 5000``: p99 1.3 s before, ≈ 20 ms after; the
gen-0 threshold counts net allocations, so a steady server now collects a few times a
minute). Reference cycles still go in the young collections; memory growth is measured
by ``aiwfe loadtest websocket`` (RSS over a long run).
"""

from __future__ import annotations

import gc

__all__ = ["restore", "tune"]


def tune(thresholds: tuple[int, ...] | list[int]) -> tuple[int, ...] | None:
    """Set ``thresholds`` and freeze what exists now; return the previous thresholds
    (None when ``thresholds`` is empty: Python's defaults stay)."""
    if not thresholds:
        return None
    before = gc.get_threshold()
    gc.set_threshold(*thresholds)
    gc.freeze()
    return before


def restore(before: tuple[int, ...] | None) -> None:
    """Undo :func:`tune`."""
    if before is not None:
        gc.unfreeze()
        gc.set_threshold(*before)
