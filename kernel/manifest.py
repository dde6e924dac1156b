"""Manifests: which plugins run in which pod, and how.

A manifest is TOML::

    [system]
    subject_prefix = "aiwfe"

    [pods.api]
    plugins = ["gateway", "auth"]
    replicas = 2

    [plugins.gateway]
    port = "${GATEWAY_PORT:-8080}"

Every string value may use ``${VAR}`` or ``${VAR:-default}``; it is replaced from the
environment after parsing (so quoting stays TOML's business) and then converted to the
field's type, so ``"${PORT:-8080}"`` fills an ``int`` field. ``${VAR}`` with VAR unset
is an error naming the variable.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from ._config_keys import did_you_mean_keys
from .errors import ConfigError
from .quotas import JobLimits

__all__ = ["Autoscaling", "Manifest", "Pod", "Resources", "System", "interpolate", "load_manifest", "parse_manifest"]


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Kubernetes requests and limits for one pod replica."""

    cpu_request: str = "250m"
    cpu_limit: str = "1000m"
    memory_request: str = "256Mi"
    memory_limit: str = "1Gi"


class Autoscaling(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """HorizontalPodAutoscaler settings (autoscaling/v2)."""

    min_replicas: int = 1
    max_replicas: int = 1
    cpu_utilization_pct: int = 70
    memory_utilization_pct: int = 80
    active_llm_requests: float | None = None
    scale_up_stabilization_s: int = 60
    scale_up_percent: int = 50
    scale_down_stabilization_s: int = 300
    scale_down_percent: int = 10


class Pod(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One pod: one process running one kernel with these plugins, in this order.

    ``handlers`` overrides the serving options of handlers in this pod, by contract
    address: ``[pods.NAME.handlers."reasoning.reason"] concurrency = 2048`` (fields of
    :class:`aiwfe.kernel.plugin.HandlerOptions`: concurrency, max_queue, timeout_s,
    ack_wait_s, max_deliver, backoff_s).
    """

    plugins: list[str]
    replicas: int = 1
    ops_port: int = 0
    resources: Resources = msgspec.field(default_factory=Resources)
    autoscaling: Autoscaling | None = None
    handlers: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)


class System(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings shared by every pod.

    ``subject_prefix`` prefixes every NATS subject and names the streams
    (``aiwfe`` → ``AIWFE_JOBS``). ``nats_url`` empty means: ``NATS_URL`` from the
    environment, else (``aiwfe up`` only) an embedded server.
    ``drain_timeout_s`` bounds how long a stopping pod waits for in-flight work.
    ``call_timeout_s`` is the deadline of a call that sets none.
    ``stream_replicas``: JetStream replicas of the streams (3 on a three-node NATS cluster).
    ``trace_sample_ratio``: share of traces kept when tracing is on
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` set); parent-based, so a trace is kept whole.
    ``gc_thresholds``: the pod process's ``gc.set_threshold`` (empty = Python's own
    ``700, 10, 10``); see :mod:`aiwfe.kernel.gc_tuning` for why the default is higher.
    ``jobs``: job address → :class:`~aiwfe.kernel.quotas.JobLimits` (caps, per-user slots).
    """

    name: str = "aiwfe"
    subject_prefix: str = "aiwfe"
    nats_url: str = ""
    drain_timeout_s: float = 10.0
    call_timeout_s: float = 30.0
    job_result_ttl_s: float = 86400.0
    event_ttl_s: float = 3600.0
    trace_sample_ratio: float = 1.0
    stream_replicas: int = 1
    gc_thresholds: tuple[int, ...] = (50_000, 20, 100)
    jobs: dict[str, JobLimits] = {}

    def __post_init__(self) -> None:
        if self.gc_thresholds and (len(self.gc_thresholds) != 3 or min(self.gc_thresholds) < 1):
            raise ValueError(f"gc_thresholds must be three positive integers or empty, not {list(self.gc_thresholds)}")


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A whole manifest. ``plugins`` maps plugin name → raw config table."""

    pods: dict[str, Pod]
    system: System = msgspec.field(default_factory=System)
    plugins: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    source: str = ""

    def pod(self, name: str) -> Pod:
        """Return pod ``name``.

        Raises:
            ConfigError: no such pod (the message lists the pods there are).
        """
        try:
            return self.pods[name]
        except KeyError:
            raise ConfigError(f"{self.source or 'manifest'}: no pod {name!r}; pods: {', '.join(self.pods)}") from None

    def pod_of(self, plugin: str) -> str | None:
        """Return the first pod that runs ``plugin``, or None."""
        for name, pod in self.pods.items():
            if plugin in pod.plugins:
                return name
        return None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string inside ``value``.

    Raises:
        ConfigError: a ``${VAR}`` without default names an unset variable.
    """
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env and (env[var] != "" or default is None):
                return env[var]
            if default is not None:
                return default
            raise ConfigError(f"{path}: ${{{var}}} is not set; set it or write ${{{var}:-default}}")

        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def parse_manifest(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> Manifest:
    """Parse manifest TOML text.

    Raises:
        ConfigError: invalid TOML, unset variables or fields that do not fit.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    raw = interpolate(raw, os.environ if env is None else env)
    raw["source"] = source
    try:
        return msgspec.convert(raw, Manifest, strict=False)
    except msgspec.ValidationError as e:  # with every misspelled key and its closest known one
        raise ConfigError(f"{source}: {e}{did_you_mean_keys(raw, Manifest)}") from None


def load_manifest(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Manifest:
    """Read and parse a manifest file.

    Raises:
        ConfigError: the file is missing or invalid.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read manifest: {e.strerror}") from None
    return parse_manifest(text, str(p), env)
