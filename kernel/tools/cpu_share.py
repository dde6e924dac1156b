"""Pods' CPU shares on one machine, from the manifest's ``resources.cpu_request``.

On Kubernetes a pod's CPU request is its weight when the node's cores are contended (the
kubelet writes it into the pod's cgroup as ``cpu.weight``/``cpu.shares``: 500m weighs half of
1000m). Pod processes that ``aiwfe up`` (and the benchmarks) start on one machine get the
same proportions from the scheduler's nice levels: each nice step is ≈ 1.25× less weight
(Linux's CFS table), so a pod gets ``round(log(largest request / its request) / log 1.25)``
steps above the manifest's largest request — 0 for the largest, +3 for half of it (weight
526 against 1024), capped at 19. Niceness is only raised, never lowered: no privilege is
needed, and a pod never takes CPU from processes outside the manifest.

Without contention nice changes nothing. With it, it decides who waits: with equal weights a
single process of the manifest's heaviest pod gets the same slice as each replica of a light
pod and each other busy process on the machine. Under the full load of ``bench ws`` the
weights made no difference beyond the run-to-run noise (PERFORMANCE.md, "Sixth pass"): they
are here because the manifest declares them, not as a speed-up.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable

from ..errors import ConfigError
from ..manifest import Manifest

__all__ = ["cpu_millicores", "lower_priority", "pod_niceness", "resource_problems"]

_QUANTITY = re.compile(r"(?:(\d{1,6})m|(\d{1,4}(?:\.\d{1,3})?))")
_STEP = math.log(1.25)
MAX_NICE = 19


def cpu_millicores(value: str) -> int:
    """A Kubernetes CPU quantity (``"500m"``, ``"2"``, ``"1.5"``) in millicores.

    Raises:
        ValueError: not such a quantity, or zero (the message says which forms are accepted).
    """
    m = _QUANTITY.fullmatch(value) if isinstance(value, str) else None  # as Kubernetes reads it: no spaces
    if m is None:
        raise ValueError(f'{value!r} is not a CPU quantity; write millicores like "500m" or cores like "1" or "1.5"')
    milli = int(m.group(1)) if m.group(1) is not None else round(float(m.group(2)) * 1000)
    if milli <= 0:
        raise ValueError(f'{value!r} is no CPU at all; a pod needs at least "1m"')
    return milli


def resource_problems(manifest: Manifest) -> list[tuple[str, str, str]]:
    """``(where, what, hint)`` for every pod whose CPU request or limit is not a quantity, or
    whose request exceeds its limit (Kubernetes refuses such a pod)."""
    out: list[tuple[str, str, str]] = []
    for name, pod in manifest.pods.items():
        where = f"[pods.{name}.resources]"
        values: dict[str, int] = {}
        for field in ("cpu_request", "cpu_limit"):
            try:
                values[field] = cpu_millicores(getattr(pod.resources, field))
            except ValueError as e:
                out.append((where, f"{field}: {e}", 'a CPU quantity is millicores ("500m") or cores ("1.5")'))
        if len(values) == 2 and values["cpu_request"] > values["cpu_limit"]:
            r = pod.resources
            what = f"cpu_request {r.cpu_request} is above cpu_limit {r.cpu_limit}"
            out.append((where, what, "lower the request or raise the limit"))
    return out


def pod_niceness(manifest: Manifest) -> dict[str, int]:
    """Pod name → the nice increment giving its processes their CPU request's share (module
    docstring).

    Raises:
        ConfigError: a pod's ``cpu_request`` or ``cpu_limit`` is not a CPU quantity.
    """
    problems = resource_problems(manifest)
    if problems:
        src = manifest.source or "manifest"
        raise ConfigError("; ".join(f"{src}: {where} {what}" for where, what, _hint in problems))
    requests = {name: cpu_millicores(pod.resources.cpu_request) for name, pod in manifest.pods.items()}
    top = max(requests.values(), default=1)
    return {name: min(MAX_NICE, max(0, round(math.log(top / milli) / _STEP))) for name, milli in requests.items()}


def lower_priority(increment: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that raises the child's niceness by ``increment`` before it runs (so
    every thread it starts inherits it), or None for 0 and where there is no ``os.nice``
    (Windows: children run at the parent's priority)."""
    if increment <= 0 or not hasattr(os, "nice"):
        return None

    def lower() -> None:
        os.nice(increment)

    return lower
