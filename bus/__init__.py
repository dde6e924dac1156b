"""Transports: :class:`NatsBus` (NATS core + JetStream) and :class:`LocalBus` (in-process).

Imported lazily so that ``import bus`` stays cheap for contract-only users.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Bus", "JobCall", "JobOptions", "LocalBus", "NatsBus"]


def __getattr__(name: str) -> Any:
    if name in ("Bus", "JobOptions", "JobCall"):
        from . import base

        return getattr(base, name)
    if name == "NatsBus":
        from .nats import NatsBus

        return NatsBus
    if name == "LocalBus":
        from .local import LocalBus

        return LocalBus
    raise AttributeError(name)
