"""Kubernetes objects for a manifest: what ``aiwfe k8s MANIFEST`` prints.

For every pod of the manifest: a Deployment running ``aiwfe run --pod NAME``, a Service
for its ops port (and the gateway's HTTP port when it runs ``gateway``), a
HorizontalPodAutoscaler (autoscaling/v2), a PodDisruptionBudget; once per manifest a
ConfigMap holding the manifest text, mounted into every pod at :data:`MANIFEST_PATH`.

Conventions the objects follow:

* Names are the pod names (a Kubernetes namespace separates systems); the ConfigMap is
  ``<system.name>-manifest``. Every name must be an RFC 1035 label (what a Service
  needs), else :class:`~aiwfe.kernel.errors.ConfigError` lists every bad one.
* Service URLs (``NATS_URL``, ``DATABASE_URL``, ``REDIS_URL``, ``QDRANT_URL``) come from
  the Secret ``<system.name>-services`` through ``envFrom``; it is not rendered, since it
  holds credentials. Each pod's NATS user comes from its Secret ``<pod>-nats``, the servers'
  authorization from ``<system.name>-nats-auth`` (:mod:`aiwfe.kernel.tools.k8s_security`).
* The ops endpoint listens on :data:`OPS_PORT` on all interfaces (``--ops-port``,
  ``AIWFE_OPS_HOST=0.0.0.0``); liveness is ``/health``, readiness ``/ready``. A gateway
  pod also gets ``AIWFE_GATEWAY_HOST=0.0.0.0`` for the manifest's
  ``host = "${AIWFE_GATEWAY_HOST:-127.0.0.1}"`` (:func:`hints` says when it is missing).
* The HorizontalPodAutoscaler owns the replica count, so the Deployment sets none (an
  ``apply`` would otherwise reset it). A pod without ``autoscaling`` gets an HPA pinned
  at ``replicas`` (min = max).
* Stopping: the preStop hook sleeps :data:`PRESTOP_SLEEP_S` so that endpoints drop the
  pod before SIGTERM, then the pod drains for up to ``system.drain_timeout_s``; the
  termination grace period covers both plus :data:`SHUTDOWN_MARGIN_S` for closing
  lifespans.

Everything here is a pure function of the manifest; :func:`to_yaml` serialises.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from typing import Any

from ..errors import ConfigError
from ..manifest import Autoscaling, Manifest, Pod
from . import k8s_security as sec
from .k8s_yaml import to_yaml  # re-exported: render() builds the objects, to_yaml() writes them

__all__ = [
    "CONTAINER_NAME",
    "DEFAULT_GATEWAY_PORT",
    "DEFAULT_IMAGE",
    "DEFAULT_LLM_REQUESTS_PER_POD",
    "GATEWAY_HOST_VAR",
    "LLM_METRIC",
    "MANIFEST_PATH",
    "OPS_PORT",
    "PRESTOP_SLEEP_S",
    "SHUTDOWN_MARGIN_S",
    "configmap_name",
    "hints",
    "render",
    "render_pod",
    "secret_name",
    "termination_grace_s",
    "to_yaml",
    "validate",
]

DEFAULT_IMAGE = "aiwfe:latest"
CONTAINER_NAME = "aiwfe"
OPS_PORT = 9000
DEFAULT_GATEWAY_PORT = 8080
MANIFEST_DIR = "/etc/aiwfe"
MANIFEST_PATH = f"{MANIFEST_DIR}/manifest.toml"
PRESTOP_SLEEP_S = 5
SHUTDOWN_MARGIN_S = 10
LLM_METRIC = "active_llm_requests"
DEFAULT_LLM_REQUESTS_PER_POD = 5.0
GATEWAY_HOST_VAR = "AIWFE_GATEWAY_HOST"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_SCALE_PERIOD_S = 60
_RUN_AS_UID = 10001

# RFC 1035 label: a Service name must also start with a letter, so every name follows it.
_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME_CHARS = 63


def configmap_name(manifest: Manifest) -> str:
    """Name of the ConfigMap that holds the manifest text: ``<system.name>-manifest``."""
    return f"{manifest.system.name}-manifest"


def secret_name(manifest: Manifest) -> str:
    """Name of the Secret the pods take service URLs from: ``<system.name>-services``."""
    return f"{manifest.system.name}-services"


def termination_grace_s(manifest: Manifest) -> int:
    """Seconds Kubernetes waits between the preStop hook and SIGKILL.

    It covers the preStop sleep, the drain limit and closing lifespans, so it is always
    longer than ``system.drain_timeout_s``.
    """
    return PRESTOP_SLEEP_S + math.ceil(manifest.system.drain_timeout_s) + SHUTDOWN_MARGIN_S


def validate(manifest: Manifest) -> None:
    """Check that ``manifest`` renders to objects a cluster accepts.

    Raises:
        ConfigError: listing every problem, each with the fix: a pod or system name that is
            not an RFC 1035 label (lowercase letters, digits and ``-``, starting with a
            letter, at most 63 characters); autoscaling bounds or percentages out of range.
    """
    problems = []
    hint = "lowercase letters, digits and '-', starting with a letter and ending with a letter or digit, at most 63 characters"
    for name, pod in manifest.pods.items():
        if not _LABEL.match(name) or len(name) > _MAX_NAME_CHARS:
            problems.append(f"pod name {name!r} is not a valid Kubernetes name ({hint}); rename [pods.{name}]")
        a = _autoscaling(pod)
        where = f"[pods.{name}.autoscaling]" if pod.autoscaling is not None else f"[pods.{name}] replicas"
        if not 1 <= a.min_replicas <= a.max_replicas:
            problems.append(f"{where}: need 1 <= min_replicas ({a.min_replicas}) <= max_replicas ({a.max_replicas})")
        if not (0 < a.cpu_utilization_pct and 0 < a.memory_utilization_pct):
            problems.append(f"{where}: cpu_utilization_pct and memory_utilization_pct must be above 0")
        if not (0 < a.scale_up_percent and 0 < a.scale_down_percent):
            problems.append(f"{where}: scale_up_percent and scale_down_percent must be above 0")
        if a.scale_up_stabilization_s < 0 or a.scale_down_stabilization_s < 0:
            problems.append(f"{where}: stabilization windows must be 0 or more seconds")
        if a.active_llm_requests is not None and a.active_llm_requests <= 0:
            problems.append(f"{where}: active_llm_requests must be above 0")
    longest = max((secret_name(manifest), configmap_name(manifest)), key=len)
    if not _LABEL.match(manifest.system.name) or len(longest) > _MAX_NAME_CHARS:
        problems.append(
            f"system.name {manifest.system.name!r} does not make a valid Kubernetes name {longest!r} ({hint}); "
            "change [system] name"
        )
    if problems:
        raise ConfigError(f"{manifest.source or 'manifest'}: " + "; ".join(problems))


def _labels(manifest: Manifest, pod: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": pod,
        "app.kubernetes.io/part-of": manifest.system.name,
        "app.kubernetes.io/component": "pod",
        "app.kubernetes.io/managed-by": "aiwfe",
    }


def _selector(manifest: Manifest, pod: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": pod, "app.kubernetes.io/part-of": manifest.system.name}


def _gateway_port(manifest: Manifest, pod: Pod) -> int | None:
    """The gateway's HTTP port when ``pod`` runs the gateway, else None.

    Raises:
        ConfigError: ``[plugins.gateway] port`` is not a port number.
    """
    if "gateway" not in pod.plugins:
        return None
    raw = manifest.plugins.get("gateway", {}).get("port", DEFAULT_GATEWAY_PORT)
    try:
        port = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"[plugins.gateway] port = {raw!r} is not a port number") from None
    if port == 0:
        return DEFAULT_GATEWAY_PORT  # 0 means "any free port" locally; a container needs a fixed one
    if not 0 < port < 65536:
        raise ConfigError(f"[plugins.gateway] port = {port} is outside 1..65535")
    return port


def hints(manifest: Manifest, manifest_text: str) -> list[str]:
    """Problems that make rendered objects valid but the pods unreachable in a cluster.

    Today: a gateway whose ``host`` is written as a fixed loopback address listens only
    inside its container. Returns one message per problem, each with the fix.
    """
    out = []
    if any("gateway" in pod.plugins for pod in manifest.pods.values()):
        try:
            raw = tomllib.loads(manifest_text).get("plugins", {}).get("gateway", {})
        except tomllib.TOMLDecodeError:
            raw = {}
        host = raw.get("host", "127.0.0.1")
        if isinstance(host, str) and "${" not in host and host in _LOOPBACK:
            out.append(
                f"[plugins.gateway] host = {host!r} listens inside the container only; write "
                f'host = "${{{GATEWAY_HOST_VAR}:-127.0.0.1}}" (the Deployment sets {GATEWAY_HOST_VAR}=0.0.0.0)'
            )
    return out


def _quantity(value: float) -> str:
    """A Kubernetes quantity string for a plain number (``5`` → ``"5"``, ``2.5`` → ``"2500m"``)."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"


def _autoscaling(pod: Pod) -> Autoscaling:
    if pod.autoscaling is not None:
        return pod.autoscaling
    return Autoscaling(min_replicas=pod.replicas, max_replicas=pod.replicas)


def _deployment(
    manifest: Manifest, name: str, pod: Pod, image: str, manifest_sha256: str, passwords: dict[str, str]
) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [{"name": "ops", "containerPort": OPS_PORT, "protocol": "TCP"}]
    gw = _gateway_port(manifest, pod)
    if gw is not None:
        ports.append({"name": "http", "containerPort": gw, "protocol": "TCP"})
    env: list[dict[str, Any]] = [
        {"name": "AIWFE_POD", "value": name},
        {"name": "AIWFE_OPS_HOST", "value": "0.0.0.0"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if gw is not None:
        env.insert(2, {"name": GATEWAY_HOST_VAR, "value": "0.0.0.0"})
    env += sec.nats_env(name)
    r = pod.resources
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["run", "-m", MANIFEST_PATH, "--pod", name, "--ops-port", str(OPS_PORT)],
        "ports": ports,
        "env": env,
        "envFrom": [{"secretRef": {"name": secret_name(manifest)}}],
        "resources": {
            "requests": {"cpu": r.cpu_request, "memory": r.memory_request},
            "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit},
        },
        "startupProbe": {
            "httpGet": {"path": "/health", "port": "ops"},
            "periodSeconds": 1,
            "failureThreshold": 30,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "ops"},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": "ops"},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "volumeMounts": [
            {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    labels = _labels(manifest, name)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": _selector(manifest, name)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "aiwfe.io/manifest-sha256": manifest_sha256,
                        "aiwfe.io/nats-credentials-sha256": sec.credentials_hash(name, passwords),
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(OPS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": termination_grace_s(manifest),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": _RUN_AS_UID,
                        "runAsGroup": _RUN_AS_UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": _selector(manifest, name)},
                        }
                    ],
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "manifest",
                            "configMap": {
                                "name": configmap_name(manifest),
                                "items": [{"key": "manifest.toml", "path": "manifest.toml"}],
                            },
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _service(manifest: Manifest, name: str, pod: Pod) -> dict[str, Any]:
    ports: list[dict[str, Any]] = [{"name": "ops", "port": OPS_PORT, "targetPort": "ops", "protocol": "TCP"}]
    gw = _gateway_port(manifest, pod)
    if gw is not None:
        ports.insert(0, {"name": "http", "port": gw, "targetPort": "http", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": _labels(manifest, name)},
        "spec": {"type": "ClusterIP", "selector": _selector(manifest, name), "ports": ports},
    }


def _hpa(manifest: Manifest, name: str, pod: Pod) -> dict[str, Any]:
    a = _autoscaling(pod)
    metrics: list[dict[str, Any]] = [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": a.cpu_utilization_pct}},
        },
        {
            "type": "Resource",
            "resource": {
                "name": "memory",
                "target": {"type": "Utilization", "averageUtilization": a.memory_utilization_pct},
            },
        },
    ]
    if "reasoning" in pod.plugins:
        per_pod = DEFAULT_LLM_REQUESTS_PER_POD if a.active_llm_requests is None else a.active_llm_requests
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": LLM_METRIC},
                    "target": {"type": "AverageValue", "averageValue": _quantity(per_pod)},
                },
            }
        )
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": _labels(manifest, name)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": metrics,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": a.scale_up_stabilization_s,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": a.scale_up_percent, "periodSeconds": _SCALE_PERIOD_S}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": a.scale_down_stabilization_s,
                    "selectPolicy": "Max",
                    "policies": [{"type": "Percent", "value": a.scale_down_percent, "periodSeconds": _SCALE_PERIOD_S}],
                },
            },
        },
    }


def _pdb(manifest: Manifest, name: str) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: a one-replica pod must not block node drains.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "labels": _labels(manifest, name)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(manifest, name)}},
    }


def _configmap(manifest: Manifest, manifest_text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name(manifest),
            "labels": {"app.kubernetes.io/part-of": manifest.system.name, "app.kubernetes.io/managed-by": "aiwfe"},
        },
        "data": {"manifest.toml": manifest_text},
    }


def render_pod(
    manifest: Manifest, pod: str, manifest_text: str, *, image: str = DEFAULT_IMAGE, passwords: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One pod's NATS Secret, Deployment, Service, HPA, PDB and NetworkPolicy (:mod:`.k8s_security`).

    ``manifest_text`` is the manifest as the ConfigMap holds it; its hash is a pod template
    annotation, so a changed manifest rolls the pods (so do new credentials, ``passwords``:
    user → NATS password, missing ones generated).

    Raises:
        ConfigError: an invalid name or autoscaling setting (see :func:`validate`), no such pod, a bad
            gateway port, or a plugin that does not load.
    """
    validate(manifest)
    spec = manifest.pod(pod)
    passwords = sec.passwords_for(manifest, passwords)
    digest = hashlib.sha256(manifest_text.encode()).hexdigest()
    gw = _gateway_port(manifest, spec)
    return [
        sec.pod_secret(manifest, pod, passwords),
        _deployment(manifest, pod, spec, image, digest, passwords),
        _service(manifest, pod, spec),
        _hpa(manifest, pod, spec),
        _pdb(manifest, pod),
        sec.network_policy(manifest, pod, [OPS_PORT] if gw is None else [gw, OPS_PORT]),
    ]


def render(
    manifest: Manifest, manifest_text: str, *, image: str = DEFAULT_IMAGE, passwords: dict[str, str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object for ``manifest``, grouped by output file stem.

    ``manifest_text`` is the manifest file's text, uninterpolated, so ``${VAR}`` is
    resolved inside the cluster from the pod's environment. ``passwords`` as in :func:`render_pod`.
    Returns ``{configmap_name: [ConfigMap], "<name>-nats-auth": [Secret], pod: [...], ...}``.

    Raises:
        ConfigError: see :func:`render_pod`.
    """
    validate(manifest)
    passwords = sec.passwords_for(manifest, passwords)
    out = {
        configmap_name(manifest): [_configmap(manifest, manifest_text)],
        sec.nats_auth_secret_name(manifest): [sec.nats_auth_secret(manifest, passwords)],
    }
    for pod in manifest.pods:
        out[pod] = render_pod(manifest, pod, manifest_text, image=image, passwords=passwords)
    return out
