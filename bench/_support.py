"""Shared helpers for benchmarks: a NATS server to measure against, percentiles, output."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["emit", "nats_server", "percentile"]


@contextlib.contextmanager
def nats_server(url: str | None) -> Iterator[str]:
    """Yield ``url`` when given, else the URL of a private embedded nats-server.

    Benchmarks default to their own embedded nats-server so that the system's server
    (and whatever else uses it) does not skew the figures.
    """
    if url:
        yield url
        return
    from aiwfe.kernel.tools.embedded import EmbeddedNats

    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-") as d, EmbeddedNats(os.path.join(d, "nats")) as srv:
        yield srv.url


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(pct / 100 * (len(s) - 1))))
    return s[k]


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's final JSON line."""
    print(json.dumps(result), flush=True)
