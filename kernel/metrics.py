"""Prometheus metrics of the kernel (exported on every pod's ``/metrics``).

Children are bound once per contract and path so that the hot path only calls
``observe``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["REGISTRY", "handled", "failed", "render", "JOBS", "REDELIVERIES", "DEAD_LETTERS", "READY"]

REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

HANDLED = Histogram(
    "aiwfe_handled_seconds",
    "Handler latency per contract and path (local = in-process, remote = over the bus)",
    ["contract", "path"],
    buckets=_BUCKETS,
    registry=REGISTRY,
)
FAILED = Counter(
    "aiwfe_failed_total", "Calls that ended in an error, per contract, path and error code", ["contract", "path", "code"], registry=REGISTRY
)
JOBS = Counter("aiwfe_jobs_total", "Job deliveries by kind and outcome", ["kind", "outcome"], registry=REGISTRY)
REDELIVERIES = Counter("aiwfe_job_redeliveries_total", "Job deliveries after the first", ["kind"], registry=REGISTRY)
DEAD_LETTERS = Counter("aiwfe_dead_letters_total", "Jobs dead-lettered after their last attempt", ["kind"], registry=REGISTRY)
READY = Gauge("aiwfe_pod_ready", "1 when the pod is ready to serve", ["pod"], registry=REGISTRY)

_children: dict[tuple[str, str], Any] = {}


def handled(contract: str, path: str) -> Any:
    """The latency histogram child for ``contract`` on ``path`` (``local``/``remote``)."""
    key = (contract, path)
    child = _children.get(key)
    if child is None:
        child = _children[key] = HANDLED.labels(contract, path)
    return child


def failed(contract: str, path: str, code: str) -> None:
    """Count one failed call."""
    FAILED.labels(contract, path, code).inc()


def render() -> bytes:
    """The Prometheus text exposition of every metric."""
    return generate_latest(REGISTRY)
