"""``aiwfe recompose OLD NEW``: move plugins between pods while traffic runs, without loss.

It does not start or stop anything: it checks that NEW is a re-composition of OLD, says which
pods to keep, start and drain, in which order, with the commands for pods run as ``aiwfe run``
processes and for Kubernetes (``aiwfe k8s``), and renders the NATS authorization both
manifests' pods need while they run side by side. The procedure (README "Re-composition"):

1. the NATS server gets the users of both manifests (``--nats-config``, then a config reload);
2. start every pod of NEW that is new or changed and wait until each answers ``/ready`` — the
   ones that gain a plugin first; the old ones still serve, so both answer for a while (queue
   groups share subjects, the jobs' durable consumer is shared by kind);
3. drain the old instances of changed and removed pods (SIGTERM: stop taking work, finish
   in-flight calls and jobs up to ``drain_timeout_s``, give unfinished jobs back to the stream);
4. the NATS server keeps only NEW's users.

Why not a command that does it: ``aiwfe up`` supervises its children and restarts one that
exits, so another process cannot drain them; on Kubernetes the rollout belongs to ``kubectl``.
The order is what makes it lossless, and it is the same everywhere; this module computes it.
"""

from __future__ import annotations

import msgspec

from ..errors import ConfigError
from ..manifest import Manifest
from . import natsauth

__all__ = ["Plan", "check", "plan", "render_steps", "transition_permissions"]


class Plan(msgspec.Struct, frozen=True):
    """Pod names: ``keep`` (same in both), ``start`` (new or changed in NEW, in start order:
    the pods that gain a plugin first), ``drain`` (old instances of changed or removed pods)."""

    keep: list[str]
    start: list[str]
    drain: list[str]

    @property
    def changed(self) -> list[str]:
        """Pods in both manifests whose definition changed (started anew, then the old drained)."""
        return [p for p in self.start if p in self.drain]


def _same(old: Manifest, new: Manifest, pod: str) -> bool:
    if old.system != new.system or old.pods[pod] != new.pods[pod]:
        return False
    return all(old.plugins.get(p) == new.plugins.get(p) for p in old.pods[pod].plugins)


def check(old: Manifest, new: Manifest) -> list[str]:
    """Why NEW is not a re-composition of OLD (empty: it is): a different subject prefix is
    another system; a plugin OLD runs and NEW does not would leave its contracts unserved."""
    problems = []
    if old.system.subject_prefix != new.system.subject_prefix:
        problems.append(
            f"subject prefix {old.system.subject_prefix!r} → {new.system.subject_prefix!r}: that is another system, not a move"
        )
    gone = sorted({p for pod in old.pods.values() for p in pod.plugins} - {p for pod in new.pods.values() for p in pod.plugins})
    if gone:
        problems.append(f"NEW runs no pod with {', '.join(gone)}: re-composition moves plugins, it does not remove them")
    return problems


def plan(old: Manifest, new: Manifest) -> Plan:
    """The pods to keep, start and drain.

    Raises:
        ConfigError: NEW is not a re-composition of OLD (every reason of :func:`check`).
    """
    problems = check(old, new)
    if problems:
        raise ConfigError("; ".join(problems))
    keep = [p for p in new.pods if p in old.pods and _same(old, new, p)]
    start = [p for p in new.pods if p not in keep]
    gains = {p for p in start if set(new.pods[p].plugins) - set(old.pods[p].plugins if p in old.pods else [])}
    start.sort(key=lambda p: p not in gains)  # stable: gainers first, manifest order otherwise
    return Plan(keep=keep, start=start, drain=[p for p in old.pods if p not in keep])


def transition_permissions(*manifests: Manifest) -> dict[str, natsauth.Permissions]:
    """The NATS users of every manifest given; a user in several gets the union of its permissions."""
    out: dict[str, natsauth.Permissions] = {}
    for m in manifests:
        for user, p in natsauth.permissions(m).items():
            q = out.get(user)
            if q is not None:
                p = natsauth.Permissions(
                    publish=tuple(dict.fromkeys(q.publish + p.publish)),
                    subscribe=tuple(dict.fromkeys(q.subscribe + p.subscribe)),
                    publish_deny=tuple(x for x in q.publish_deny if x in p.publish_deny),
                    allow_responses=q.allow_responses or p.allow_responses,
                )
            out[user] = p
    return out


def render_steps(p: Plan, old: Manifest, new: Manifest, old_path: str, new_path: str) -> str:
    """The plan as text: the pods, then the steps for ``aiwfe run`` processes and for Kubernetes."""

    def plugins(m: Manifest, pod: str) -> str:
        return ", ".join(m.pods[pod].plugins)

    width = max((len(x) for x in [*p.keep, *p.start, *p.drain]), default=0) + 2
    lines = [f"recompose {old_path} → {new_path}: start {len(p.start)} pod(s), then drain {len(p.drain)}; keep {len(p.keep)}"]
    lines += [f"  keep   {x:<{width}}{plugins(new, x)}" for x in p.keep]
    lines += [f"  start  {x:<{width}}{plugins(new, x)}" for x in p.start]
    lines += [f"  drain  {x:<{width}}{plugins(old, x)}" for x in p.drain]
    drain_s = old.system.drain_timeout_s
    lines += [
        "",
        "Pods run as `aiwfe run` processes:",
        f"  1. NATS: load both manifests' users (`aiwfe recompose {old_path} {new_path} --nats-config PASSWORDS.json`), reload",
        *(f"  2. aiwfe run -m {new_path} --pod {x} &   # until http://<ops>/ready answers 200" for x in p.start),
        *(
            f"  3. kill -TERM <pid of the {old_path} pod {x}>   # drains up to {drain_s:g} s; wait for it to exit"
            for x in p.drain
        ),
        f"  4. NATS: keep only {new_path}'s users (`aiwfe recompose {new_path} {new_path} --nats-config PASSWORDS.json`), reload",
        "",
        "Kubernetes (`aiwfe k8s NEW -o DIR` writes one file per pod):",
        "  1. the <name>-nats-auth Secret: both manifests' users (--nats-config), reload the NATS servers;",
        "     kubectl apply -f DIR/<name>-manifest.yaml   # NEW's manifest: pods read it when they start",
        *(f"  2. kubectl apply -f DIR/{x}.yaml && kubectl rollout status deployment/{x}" for x in p.start),
        *(
            f"  3. kubectl delete deployment,service,hpa,pdb {x}   # SIGTERM after preStop: it drains"
            for x in p.drain
            if x not in new.pods
        ),
        "  4. kubectl apply -f DIR   # the ConfigMap, NEW's Secrets; unchanged pods roll one replica at a time",
    ]
    if p.changed:
        lines.append(
            f"  ({', '.join(p.changed)}: same name, new definition — its rollout starts the new replica before draining the old)"
        )
    return "\n".join(lines) + "\n"
