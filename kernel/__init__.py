"""The AIWFE kernel: contracts, plugins, manifests, routing and pods.

The kernel never imports a plugin; plugins import the kernel.
"""

from .contract import Event, Job, Message, Reply, Request, address_of, kind_of, reply_type, schema_hash
from .errors import (
    AiwfeError,
    BadMessage,
    ConfigError,
    DeadlineExceeded,
    Forbidden,
    Overloaded,
    RemoteError,
    SchemaMismatch,
    Unavailable,
    UndeclaredCall,
)
from .manifest import Manifest, load_manifest, parse_manifest
from .plugin import HandlerOptions, Plugin, serves
from .runtime import Caller, JobContext, Kernel, current_deadline, current_job

__all__ = [
    "AiwfeError",
    "BadMessage",
    "Caller",
    "ConfigError",
    "DeadlineExceeded",
    "Event",
    "Forbidden",
    "HandlerOptions",
    "Job",
    "JobContext",
    "Kernel",
    "Manifest",
    "Message",
    "Overloaded",
    "Plugin",
    "RemoteError",
    "Reply",
    "Request",
    "SchemaMismatch",
    "Unavailable",
    "UndeclaredCall",
    "address_of",
    "current_deadline",
    "current_job",
    "kind_of",
    "load_manifest",
    "parse_manifest",
    "reply_type",
    "schema_hash",
    "serves",
]
