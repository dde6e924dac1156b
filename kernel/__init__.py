"""The AIWFE kernel: contracts, plugins, manifests, routing, jobs and pods.

The kernel never imports a plugin; plugins import the kernel. Names are loaded on first
use, so ``import aiwfe.kernel.contract`` (what every plugin's ``contract.py`` does) loads
msgspec and the standard library only, not the runtime, the bus, OpenTelemetry or
prometheus_client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "contract": (
        "Event",
        "Idempotent",
        "Job",
        "Message",
        "Reply",
        "Request",
        "address_of",
        "kind_of",
        "reply_type",
        "schema_hash",
    ),
    "errors": (
        "AiwfeError",
        "BadMessage",
        "ConfigError",
        "DeadlineExceeded",
        "Forbidden",
        "Overloaded",
        "PeerLost",
        "RemoteError",
        "SchemaMismatch",
        "Unavailable",
        "UndeclaredCall",
    ),
    "manifest": ("Manifest", "load_manifest", "parse_manifest"),
    "plugin": ("HandlerOptions", "Plugin", "serves"),
    "routing": ("Caller", "Kernel"),
    "jobs": ("JobContext", "JobEvent", "JobRecord", "current_job"),
    "limiter": ("Limiter",),
    "serving": ("acting_for", "current_deadline", "current_owner"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "AiwfeError",
    "BadMessage",
    "Caller",
    "ConfigError",
    "DeadlineExceeded",
    "Event",
    "Forbidden",
    "HandlerOptions",
    "Idempotent",
    "Job",
    "JobContext",
    "JobEvent",
    "JobRecord",
    "Kernel",
    "Limiter",
    "Manifest",
    "Message",
    "Overloaded",
    "PeerLost",
    "Plugin",
    "RemoteError",
    "Reply",
    "Request",
    "SchemaMismatch",
    "Unavailable",
    "UndeclaredCall",
    "acting_for",
    "address_of",
    "current_deadline",
    "current_job",
    "current_owner",
    "kind_of",
    "load_manifest",
    "parse_manifest",
    "reply_type",
    "schema_hash",
    "serves",
]  # the names of _EXPORTS (tests/unit/test_layers.py checks)

if TYPE_CHECKING:
    from .contract import Event, Idempotent, Job, Message, Reply, Request, address_of, kind_of, reply_type, schema_hash
    from .errors import (
        AiwfeError,
        BadMessage,
        ConfigError,
        DeadlineExceeded,
        Forbidden,
        Overloaded,
        PeerLost,
        RemoteError,
        SchemaMismatch,
        Unavailable,
        UndeclaredCall,
    )
    from .jobs import JobContext, JobEvent, JobRecord, current_job
    from .limiter import Limiter
    from .manifest import Manifest, load_manifest, parse_manifest
    from .plugin import HandlerOptions, Plugin, serves
    from .routing import Caller, Kernel
    from .serving import acting_for, current_deadline, current_owner


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")  # a submodule: aiwfe.kernel.pg
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
