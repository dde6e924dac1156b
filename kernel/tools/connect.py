"""Choosing a pod's bus from its manifest and the environment (``aiwfe run``, ``aiwfe up``)."""

from __future__ import annotations

import os

from aiwfe.bus.base import Bus

from ..errors import ConfigError
from ..manifest import Manifest

__all__ = ["make_bus", "nats_url_for"]


def nats_url_for(manifest: Manifest) -> str:
    """The NATS URL a pod uses: the manifest's ``system.nats_url``, else ``NATS_URL``.

    ``local://`` selects the in-process LocalBus (single-pod runs without NATS).

    Raises:
        ConfigError: neither is set.
    """
    url = manifest.system.nats_url or os.environ.get("NATS_URL", "")
    if not url:
        raise ConfigError("no NATS URL: set NATS_URL (or use `aiwfe up`, which starts an embedded NATS)")
    return url


def make_bus(manifest: Manifest, *, name: str, connect_timeout_s: float | None = 10.0, url: str | None = None) -> Bus:
    """Build the bus a manifest asks for."""
    url = url or nats_url_for(manifest)
    s = manifest.system
    if url.startswith("local:"):
        from aiwfe.bus.local import LocalBus

        return LocalBus(s.subject_prefix)
    from aiwfe.bus.nats import NatsBus

    return NatsBus(
        url,
        s.subject_prefix,
        name=name,
        connect_timeout_s=connect_timeout_s,
        event_ttl_s=s.event_ttl_s,
        result_ttl_s=s.job_result_ttl_s,
        replicas=s.stream_replicas,
    )
