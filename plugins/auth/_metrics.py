"""The auth plugin's metrics: failures by reason, claim-cache results, Redis bypasses, and the
``aiwfe_auth_degraded`` gauge over the running plugins."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aiwfe.kernel import metrics

__all__ = ["FAILURES"]

FAILURES = Counter(
    "aiwfe_auth_failures_total",
    "Authentication failures by reason (token reasons, invalid_credentials, throttled, user_exists, invalid_input)",
    ["reason"],
    registry=metrics.REGISTRY,
)

_plugins: weakref.WeakSet[Any] = weakref.WeakSet()  # the running AuthPlugins


class _DegradedCollector(Collector):
    """``aiwfe_auth_degraded{dependency}``: 1 when a running auth plugin is bypassing it."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("aiwfe_auth_degraded", "1 while auth runs without a dependency", labels=["dependency"])
        redis_down = db_down = 0
        for p in list(_plugins):
            if p.cache is not None and p.cache.status():
                redis_down = 1
            if p.store is not None and not p.store.breaker.closed:
                db_down = 1
        fam.add_metric(["redis"], redis_down)
        fam.add_metric(["database"], db_down)
        yield fam


metrics.REGISTRY.register(_DegradedCollector())
