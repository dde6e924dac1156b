"""aiwfe.testing: AIWFE's own testing power for plugin authors (a pytest plugin).

* real servers chosen in order — a URL from the environment, testcontainers when a Docker
  engine answers, embedded servers from pip packages (:mod:`aiwfe.testing.servers`);
* a placement runner: one test body under every placement of the plugins — in one pod
  in-process, one pod per plugin each in its own process over NATS, seeded random
  partitions (:mod:`aiwfe.testing.placement`, :mod:`aiwfe.testing.system`);
* the pytest fixtures and the ``aiwfe_placements`` marker (:mod:`aiwfe.testing.plugin`,
  registered through the ``pytest11`` entry point).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .placement import Placement, SystemSpec, build_manifest, partition
    from .servers import ServerUnavailable, secured_nats, service
    from .system import PlacementMismatch, System, start_system

# Imported on first use: the pytest plugin loads this package in every pytest run.
_WHERE = {
    "Placement": "placement",
    "SystemSpec": "placement",
    "build_manifest": "placement",
    "partition": "placement",
    "ServerUnavailable": "servers",
    "secured_nats": "servers",
    "service": "servers",
    "PlacementMismatch": "system",
    "System": "system",
    "start_system": "system",
}
__all__ = [
    "Placement",
    "PlacementMismatch",
    "ServerUnavailable",
    "System",
    "SystemSpec",
    "build_manifest",
    "partition",
    "secured_nats",
    "service",
    "start_system",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
