"""The security objects of ``aiwfe k8s``: NATS credentials as Secrets and a NetworkPolicy per pod.

* ``<pod>-nats`` (one per pod): ``NATS_USER`` (``pod-<pod>``) and ``NATS_PASSWORD``; the
  pod's Deployment reads both through ``secretKeyRef``, and the kernel puts them into every
  server address of ``NATS_URL`` that carries no credentials
  (:func:`aiwfe.kernel.tools.connect.with_env_credentials`).
* ``<system.name>-nats-auth``: ``authorization.conf``, the nats-server ``authorization``
  block with every user's least-privilege permissions (:mod:`aiwfe.kernel.tools.natsauth`),
  for the NATS servers to ``include``; and the ``admin`` and ``publisher`` credentials
  (``admin.password``, ``publisher.password``) for operators and external publishers.
* ``<pod>`` NetworkPolicy: ingress only to the pod's ops port (probes, Prometheus) and its
  gateway port when it runs the gateway; egress only to DNS and NATS, and to PostgreSQL,
  Redis, Qdrant or the LLM provider's ports when its plugins use them
  (:data:`EGRESS_PORTS`). Destinations are not restricted, only ports: the servers'
  addresses come from the ``<system.name>-services`` Secret the renderer never sees.

Passwords: given (``aiwfe k8s --nats-passwords FILE`` keeps them in a file, created mode
0600 and reused, so re-rendering keeps every credential), else new random ones.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from ..manifest import Manifest
from . import natsauth
from .natsauth import ADMIN, PUBLISHER, pod_user

__all__ = [
    "EGRESS_PORTS",
    "credentials_hash",
    "nats_auth_secret",
    "nats_auth_secret_name",
    "nats_env",
    "network_policy",
    "passwords_for",
    "pod_secret",
    "pod_secret_name",
]

#: Egress ports by what a pod's plugins need: always DNS and NATS; the rest by plugin.
EGRESS_PORTS: dict[str, list[tuple[str, int]]] = {
    "dns": [("UDP", 53), ("TCP", 53)],
    "nats": [("TCP", 4222)],
    "postgres": [("TCP", 5432)],
    "redis": [("TCP", 6379)],
    "qdrant": [("TCP", 6333), ("TCP", 6334)],
    "llm": [("TCP", 443), ("TCP", 11434)],  # OpenAI-compatible over HTTPS, Ollama
}
_PLUGIN_NEEDS = {"memory": ["qdrant"], "reasoning": ["llm"], "perception": [], "helios": []}


def nats_auth_secret_name(manifest: Manifest) -> str:
    """The Secret with the server's authorization configuration: ``<system.name>-nats-auth``."""
    return f"{manifest.system.name}-nats-auth"


def passwords_for(manifest: Manifest, given: dict[str, str] | None = None) -> dict[str, str]:
    """A password for every user of ``manifest``: ``given``'s, new random ones for the rest."""
    given = given or {}
    return {u: given.get(u) or secrets.token_urlsafe(32) for u in natsauth.permissions(manifest)}


def pod_secret_name(pod: str) -> str:
    """The Secret holding a pod's NATS credentials: ``<pod>-nats``."""
    return f"{pod}-nats"


def _meta(manifest: Manifest, name: str, pod: str | None = None) -> dict[str, Any]:
    labels = {"app.kubernetes.io/part-of": manifest.system.name, "app.kubernetes.io/managed-by": "aiwfe"}
    if pod is not None:
        labels["app.kubernetes.io/name"] = pod
    return {"name": name, "labels": labels}


def pod_secret(manifest: Manifest, pod: str, passwords: dict[str, str]) -> dict[str, Any]:
    """The Secret with pod ``pod``'s NATS user and password."""
    user = pod_user(pod)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(manifest, pod_secret_name(pod), pod),
        "type": "Opaque",
        "stringData": {"NATS_USER": user, "NATS_PASSWORD": passwords[user]},
    }


def credentials_hash(pod: str, passwords: dict[str, str]) -> str:
    """A digest of the pod's credentials (a pod template annotation: new credentials roll the pods)."""
    return hashlib.sha256(f"{pod_user(pod)}:{passwords[pod_user(pod)]}".encode()).hexdigest()


def nats_env(pod: str) -> list[dict[str, Any]]:
    """The Deployment's ``NATS_USER`` / ``NATS_PASSWORD`` entries, from the pod's Secret."""
    name = pod_secret_name(pod)
    return [{"name": key, "valueFrom": {"secretKeyRef": {"name": name, "key": key}}} for key in ("NATS_USER", "NATS_PASSWORD")]


def nats_auth_secret(manifest: Manifest, passwords: dict[str, str]) -> dict[str, Any]:
    """The Secret with the nats-server authorization configuration and the operator's and
    external publisher's credentials."""
    perms = natsauth.permissions(manifest)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(manifest, nats_auth_secret_name(manifest)),
        "type": "Opaque",
        "stringData": {
            "authorization.conf": natsauth.render_config(perms, passwords),
            "admin.user": ADMIN,
            "admin.password": passwords[ADMIN],
            "publisher.user": PUBLISHER,
            "publisher.password": passwords[PUBLISHER],
        },
    }


def _services(manifest: Manifest, pod: str) -> set[str]:
    """What the pod's plugins declare in ``Plugin.services`` ("postgres", "redis")."""
    from ..registry import discover, resolve

    installed = discover()
    out: set[str] = set()
    for name in manifest.pods[pod].plugins:
        try:
            out.update(getattr(resolve(name, installed), "services", ()))
        except (LookupError, ImportError):
            continue  # natsauth.permissions() reports it
    return out


def network_policy(manifest: Manifest, pod: str, ingress_ports: list[int]) -> dict[str, Any]:
    """Pod ``pod``'s NetworkPolicy: ingress to ``ingress_ports`` only, egress by need."""
    needs = ["dns", "nats", *sorted(s for s in _services(manifest, pod) if s in EGRESS_PORTS)]
    for plugin in manifest.pods[pod].plugins:
        needs += _PLUGIN_NEEDS.get(plugin, [])
    egress_ports = []
    for need in dict.fromkeys(needs):
        egress_ports += [{"protocol": proto, "port": port} for proto, port in EGRESS_PORTS[need]]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(manifest, pod, pod),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": pod, "app.kubernetes.io/part-of": manifest.system.name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": p} for p in ingress_ports]}],
            "egress": [{"ports": egress_ports}],
        },
    }
