"""Placements: which plugins run in which pod (Service Weaver's idea: placement is configuration).

* ``monolith`` — every plugin in one pod, in the test's own process, on a :class:`LocalBus`;
* ``per_plugin`` — one pod per plugin, each an ``aiwfe run`` child process, over NATS;
* ``random:SEED`` — a seeded random partition of the plugins into 2..n pods, each a child
  process over NATS (``random`` alone takes the seeds of ``--aiwfe-seeds``);
* ``manifest`` — the pods as the test's manifest writes them, each a child process.

A :class:`SystemSpec` is what a test runs: plugins (entry-point names or ``module:Class``;
a fake replaces a plugin by being listed instead of it), their configuration, system
settings, extra environment and the services it needs. :func:`build_manifest` turns a spec
and a placement into manifest data.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "Placement", "SystemSpec", "build_manifest", "partition", "pod_name"]

KINDS = ("monolith", "per_plugin", "random", "manifest")


@dataclasses.dataclass(frozen=True)
class Placement:
    """One placement: ``kind`` (one of :data:`KINDS`) and, for ``random``, its ``seed``."""

    kind: str
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str | Placement) -> Placement:
        """``"monolith"``, ``"per_plugin"``, ``"random:7"``, ``"manifest"``.

        Raises:
            ValueError: an unknown kind, or a seed that is not an integer.
        """
        if isinstance(spec, Placement):
            return spec
        kind, _, seed = str(spec).partition(":")
        if kind not in KINDS:
            raise ValueError(f"placement {spec!r}: the kind is one of {', '.join(KINDS)} (random:SEED for a seeded one)")
        if seed and kind != "random":
            raise ValueError(f"placement {spec!r}: only random takes a seed")
        try:
            return cls(kind, int(seed) if seed else (0 if kind == "random" else None))
        except ValueError:
            raise ValueError(f"placement {spec!r}: the seed must be an integer") from None

    def __str__(self) -> str:
        return f"random:{self.seed}" if self.kind == "random" else self.kind

    @property
    def in_process(self) -> bool:
        """True when every pod runs in the test's process (on a LocalBus)."""
        return self.kind == "monolith"

    def pods(self, spec: SystemSpec) -> dict[str, list[str]]:
        """Pod name → its plugins (in the spec's order: plugins start in that order)."""
        if self.kind == "monolith":
            return {"monolith": list(spec.plugins)}
        if self.kind == "per_plugin":
            out: dict[str, list[str]] = {}
            for p in spec.plugins:
                name = pod_name(p)
                while name in out:
                    name += "-2"
                out[name] = [p]
            return out
        if self.kind == "random":
            return partition(spec.plugins, self.seed or 0)
        if spec.pods is None:
            raise ValueError("placement 'manifest' needs a spec with pods (SystemSpec.from_manifest)")
        return {name: list(pod.get("plugins", [])) for name, pod in spec.pods.items()}


def pod_name(plugin: str) -> str:
    """A pod name (letters, digits, ``-``, ``_``: it names a NATS user) for a plugin spec:
    ``memory`` → ``memory``, ``tests.fakes:FakeLLM`` → ``fakellm``."""
    base = plugin.rpartition(":")[2].rpartition(".")[2].lower()
    base = re.sub(r"[^a-z0-9_-]+", "-", base).strip("-")[:48] or "pod"
    return base


def partition(plugins: list[str], seed: int) -> dict[str, list[str]]:
    """A seeded random partition of ``plugins`` into 2..n non-empty pods (one pod for one plugin),
    the same for the same seed; each pod keeps the plugins' order."""
    rng = random.Random(seed)
    n = len(plugins)
    if n == 0:
        return {}
    k = rng.randint(min(2, n), n)
    order = list(range(n))
    rng.shuffle(order)
    groups: list[list[int]] = [[] for _ in range(k)]
    for i, p in enumerate(order):
        groups[i if i < k else rng.randrange(k)].append(p)
    return {f"pod{j}": [plugins[p] for p in sorted(g)] for j, g in enumerate(groups)}


@dataclasses.dataclass
class SystemSpec:
    """What a test runs.

    ``plugins``: in start order (the gateway last, so it opens last and closes first).
    ``config``: ``[plugins.<name>]`` tables by plugin spec. ``system``: ``[system]`` settings
    (the subject prefix is the test's own). ``env``: environment of the pods (and of
    manifest interpolation). ``services``: servers the pods need, of ``nats``, ``postgres``,
    ``redis``, ``qdrant``: their URLs reach the pods as ``DATABASE_URL``, ``REDIS_URL``,
    ``QDRANT_URL``. ``pods``: the pods as a manifest writes them (for the ``manifest`` placement).
    """

    plugins: list[str] = dataclasses.field(default_factory=list)
    config: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    system: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    services: tuple[str, ...] = ()
    pods: dict[str, dict[str, Any]] | None = None

    @classmethod
    def from_manifest(cls, manifest: str | os.PathLike[str], **kw: Any) -> SystemSpec:
        """A spec from manifest TOML (a path, or the text itself): its plugins in pod order (each
        once, the gateway last), their configuration, its system settings and its pods.
        ``${VAR}`` stays for the pods to resolve."""
        text = Path(manifest).read_text() if isinstance(manifest, os.PathLike) or "\n" not in str(manifest) else str(manifest)
        data = tomllib.loads(text)
        pods = {name: dict(pod) for name, pod in data.get("pods", {}).items()}
        plugins = list(dict.fromkeys(p for pod in pods.values() for p in pod.get("plugins", [])))
        if "gateway" in plugins:  # the gateway opens last (and closes first) wherever it is placed
            plugins = [p for p in plugins if p != "gateway"] + ["gateway"]
        return cls(plugins=plugins, config=dict(data.get("plugins", {})), system=dict(data.get("system", {})), pods=pods, **kw)

    @property
    def has_gateway(self) -> bool:
        """True when the gateway plugin is one of the plugins."""
        return "gateway" in self.plugins


def build_manifest(spec: SystemSpec, placement: Placement, prefix: str, gateway_port: int | None = None) -> dict[str, Any]:
    """Manifest data for ``spec`` under ``placement``, on subject prefix ``prefix``; the gateway
    (if any) listens on 127.0.0.1:``gateway_port`` unless its configuration names a port."""
    pods: dict[str, dict[str, Any]] = {}
    for name, plugins in placement.pods(spec).items():
        written = (spec.pods or {}).get(name, {}) if placement.kind == "manifest" else {}
        pods[name] = {**written, "plugins": plugins}
    config = {name: dict(cfg) for name, cfg in spec.config.items()}
    if spec.has_gateway and gateway_port is not None:
        gw = config.setdefault("gateway", {})
        if not gw.get("port"):
            gw["port"] = gateway_port
        gw.setdefault("host", "127.0.0.1")
    system = {"drain_timeout_s": 2, **spec.system, "subject_prefix": prefix}
    return {"system": system, "pods": pods, "plugins": config}
