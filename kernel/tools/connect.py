"""Choosing a pod's bus from its manifest and the environment (``aiwfe run``, ``aiwfe up``).

NATS credentials and TLS come from the environment (:data:`NATS_ENV`), never from the
manifest: every pod has its own credentials, and secrets do not belong in a file that is
shared and versioned. The URL's userinfo (``nats://user:pass@host``) works too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from aiwfe.bus.base import Bus
from aiwfe.bus.nats_connect import ConnectOptionError, NatsConnectOptions

from ..errors import ConfigError
from ..manifest import Manifest

__all__ = ["NATS_ENV", "make_bus", "nats_connect_options", "nats_url_for"]

#: Environment variable → :class:`NatsConnectOptions` field.
NATS_ENV = {
    "NATS_USER": "user",
    "NATS_PASSWORD": "password",
    "NATS_TOKEN": "token",
    "NATS_CREDS": "creds_file",
    "NATS_NKEY_SEED": "nkey_seed_file",
    "NATS_TLS_CA": "tls_ca_file",
    "NATS_TLS_CERT": "tls_cert_file",
    "NATS_TLS_KEY": "tls_key_file",
    "NATS_TLS_HOSTNAME": "tls_hostname",
}


def nats_connect_options(environ: Mapping[str, str] | None = None) -> NatsConnectOptions:
    """NATS credentials and TLS from the environment (:data:`NATS_ENV`), checked: every
    file named is read once.

    Raises:
        ConfigError: a setting is unusable (the message names the variable).
    """
    env = os.environ if environ is None else environ
    fields = {f: env[var] for var, f in NATS_ENV.items() if env.get(var)}
    opts = NatsConnectOptions(**fields)
    try:
        opts.check()
    except ConnectOptionError as e:
        var = next((v for v, f in NATS_ENV.items() if f == e.field), e.field)
        raise ConfigError(f"{var}: {e.message}") from None
    return opts


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
    """Build the bus a manifest asks for, with NATS credentials and TLS from the environment.

    Raises:
        ConfigError: no URL, or a NATS setting is unusable.
    """
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
        connect_options=nats_connect_options(),
    )
