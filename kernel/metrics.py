"""Prometheus metrics of the kernel (exported on every pod's ``/metrics``).

Children are bound once per contract and path so that the hot path only calls
``observe``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "DEAD_LETTERS",
    "JOBS",
    "OVERDUE_GRACE_S",
    "QUEUE_DEPTH",
    "QUEUE_OLDEST",
    "READY",
    "REDELIVERIES",
    "REGISTRY",
    "FastHistogram",
    "failed",
    "handled",
    "render",
    "stuck",
    "watch_overdue",
]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes, ...

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class FastHistogram:
    """One histogram series without locks: the event loop is its only writer.

    prometheus_client's Histogram takes a lock per observation (~0.9 µs); this one
    costs a bisect and two additions.
    """

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Record one observation."""
        self.counts[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.sum += seconds


class _HandledCollector(Collector):
    def __init__(self) -> None:
        self.series: dict[tuple[str, str], FastHistogram] = {}

    def collect(self) -> Iterator[HistogramMetricFamily]:
        fam = HistogramMetricFamily(
            "aiwfe_handled_seconds",
            "Handler latency per contract and path (local = in-process, remote = over the bus)",
            labels=["contract", "path"],
        )
        for (contract, path), h in sorted(self.series.items()):
            acc, buckets = 0, []
            for le, c in zip((*(str(b) for b in _BUCKETS), "+Inf"), h.counts, strict=True):
                acc += c
                buckets.append((le, acc))
            fam.add_metric([contract, path], buckets, h.sum)
        yield fam


class _OverdueCollector(Collector):
    """``aiwfe_handlers_overdue{contract}``, read from the endpoints at scrape time."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily(
            "aiwfe_handlers_overdue",
            "Handler invocations still running past their deadline (cancelled but not ended), per contract",
            labels=["contract"],
        )
        totals: dict[str, int] = {}
        for ep in list(self.sources):
            totals[ep.spec.address] = totals.get(ep.spec.address, 0) + stuck(ep)
        for contract, n in sorted(totals.items()):
            fam.add_metric([contract], n)
        yield fam


_handled = _HandledCollector()
REGISTRY.register(_handled)
_overdue = _OverdueCollector()
REGISTRY.register(_overdue)
FAILED = Counter(
    "aiwfe_failed_total",
    "Calls that ended in an error, per contract, path and error code",
    ["contract", "path", "code"],
    registry=REGISTRY,
)
JOBS = Counter("aiwfe_jobs_total", "Job deliveries by kind and outcome", ["kind", "outcome"], registry=REGISTRY)
REDELIVERIES = Counter("aiwfe_job_redeliveries_total", "Job deliveries after the first", ["kind"], registry=REGISTRY)
DEAD_LETTERS = Counter("aiwfe_dead_letters_total", "Jobs dead-lettered after their last attempt", ["kind"], registry=REGISTRY)
READY = Gauge("aiwfe_pod_ready", "1 when the pod is ready to serve", ["pod"], registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "aiwfe_job_queue_depth", "Jobs waiting or running, per kind (from the stream's consumer)", ["kind"], registry=REGISTRY
)
QUEUE_OLDEST = Gauge("aiwfe_job_oldest_age_seconds", "Age of the oldest job not yet done, per kind", ["kind"], registry=REGISTRY)


def handled(contract: str, path: str) -> FastHistogram:
    """The latency histogram for ``contract`` on ``path`` (``local``/``remote``)."""
    key = (contract, path)
    h = _handled.series.get(key)
    if h is None:
        h = _handled.series[key] = FastHistogram()
    return h


#: Work still running this long after its deadline fired counts as stuck: a handler that
#: honours cancellation ends within a loop turn or two.
OVERDUE_GRACE_S = 1.0


def stuck(endpoint: Any, grace_s: float = OVERDUE_GRACE_S) -> int:
    """How many invocations of ``endpoint`` (an :class:`aiwfe.kernel.serving.Endpoint`) still
    run more than ``grace_s`` after their deadline fired (its ``overdue``: timer → when it fired)."""
    if not endpoint.overdue:
        return 0
    cut = time.monotonic() - grace_s
    return sum(1 for fired in endpoint.overdue.values() if fired <= cut)


def watch_overdue(endpoint: Any) -> None:
    """Export :func:`stuck` as ``aiwfe_handlers_overdue{contract=endpoint.spec.address}``
    while the endpoint lives."""
    _overdue.sources.add(endpoint)


def failed(contract: str, path: str, code: str) -> None:
    """Count one failed call."""
    FAILED.labels(contract, path, code).inc()


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(REGISTRY)


async def watch_queue(kind: str, stats: Callable[[str], Awaitable[tuple[int, float]]], every_s: float = 5.0) -> None:
    """Export the queue depth and the oldest job's age of ``kind`` every ``every_s``."""
    while True:
        try:
            depth, age = await stats(kind)
            QUEUE_DEPTH.labels(kind).set(depth)
            QUEUE_OLDEST.labels(kind).set(age)
        except Exception as e:  # the next round tries again; the gauges keep their last value
            logging.getLogger("aiwfe.jobs").debug("queue watch of %s: %r", kind, e)
        await asyncio.sleep(every_s)
