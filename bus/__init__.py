"""Transports: :class:`NatsBus` (NATS core + JetStream) and :class:`LocalBus` (in-process).

The bus moves bytes (see :mod:`aiwfe.bus.base` for its roles) and never imports the
kernel. Imported lazily so that ``import aiwfe.bus`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Bus", "ConsumerOptions", "LocalBus", "NatsBus"]


def __getattr__(name: str) -> Any:
    if name in ("Bus", "ConsumerOptions"):
        from . import base

        return getattr(base, name)
    if name == "NatsBus":
        from .nats import NatsBus

        return NatsBus
    if name == "LocalBus":
        from .local import LocalBus

        return LocalBus
    raise AttributeError(name)
