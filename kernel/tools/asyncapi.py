"""``aiwfe asyncapi``: the AsyncAPI 3.0.0 document of a system's NATS surface.

Generated from the contracts the kernel itself uses — the plugin classes a manifest names,
loaded through the kernel's registry as ``aiwfe check`` does — never written by hand:

* every request a pod serves: channel ``<prefix>.<address>`` (receive, queue group = the
  subject) with its reply on the requester's inbox (the AsyncAPI ``reply`` object);
* every job kind: ``<prefix>.submit.<kind>`` (validated submission, reply ``{"job_id"}``,
  open to pods and the external-publisher role) and ``<prefix>.jobs.<kind>`` (the
  ``<PREFIX>_JOBS`` stream, pods only);
* every event a plugin emits or subscribes to: ``<prefix>.<address>``;
* job events on ``<prefix>.events.{job_id}`` (the kernel's ``job.*`` events and the
  plugins' own, told apart by the ``Aiwfe-Type`` header) and ``<prefix>.status.job``, where
  external clients read outcomes and events as JSON.

Payloads are JSON Schemas from msgspec (``msgspec.json.schema_components``); headers,
the ``Aiwfe-Error`` reply header and the server's security scheme are described too.
Which pods serve, publish or consume a subject, and which NATS users of the rendered
authorization (:func:`aiwfe.kernel.tools.natsauth.permissions`) may publish to it, are in
``x-aiwfe-*`` extensions.
:func:`for_manifest` builds the document of a manifest; :func:`for_pods` of a running system
(pod name → plugin names, as ``<prefix>.control.status`` reports them: the gateway's
``GET /v1/asyncapi.json``). Bus message details: :mod:`._asyncapi_parts`.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

import msgspec

from ..contract import Event, address_of, kind_of, reply_type
from ..errors import ConfigError
from ..manifest import Manifest, Pod, System
from ..plugin import Plugin, handlers_of, validate_plugin_class
from ..registry import discover, resolve
from ._asyncapi_parts import Parts, Surface
from .natsauth import Permissions, permissions

__all__ = ["Surface", "document", "for_manifest", "for_pods", "publishers", "surface"]

ASYNCAPI_VERSION = "3.0.0"


def surface(pods: Mapping[str, Iterable[type[Plugin]]]) -> Surface:
    """Collect what a layout serves, calls, emits and consumes, by contract.

    ``pods`` maps a pod name to its plugin classes. Job events are the Event contracts
    defined in the modules of the plugins' contracts that no plugin publishes or
    subscribes to on the bus (they can only travel on a job's event subject).
    """
    s = Surface()
    modules: set[str] = set()
    for pod, classes in pods.items():
        for cls in classes:
            for spec in handlers_of(cls):
                if spec.address == "?":
                    continue
                modules.add(spec.contract.__module__)
                table = {"request": s.requests, "job": s.jobs, "event": s.event_subscribers}[spec.kind]
                table.setdefault(spec.contract, set()).add(pod)
            for c in cls.calls:
                try:
                    kind = kind_of(c)
                    address_of(c)
                except TypeError:
                    continue
                modules.add(c.__module__)
                if kind != "job":  # any pod may queue a job: its kind is all that matters
                    table = s.callers if kind == "request" else s.event_emitters
                    table.setdefault(c, set()).add(pod)
    bus_events = set(s.event_subscribers) | set(s.event_emitters)
    for name in sorted(modules):
        mod = sys.modules.get(name)
        for obj in vars(mod).values() if mod is not None else ():
            if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event and obj not in bus_events:
                try:
                    address_of(obj)
                except TypeError:
                    continue
                if obj.__module__ == name:
                    s.job_events.add(obj)
    return s


def _servers(nats_url: str) -> dict[str, object]:
    """The NATS servers of a manifest (credentials never copied), else one templated server."""
    security = [
        {"$ref": "#/components/securitySchemes/userPassword"},
        {"$ref": "#/components/securitySchemes/clientCertificate"},
    ]
    servers: dict[str, object] = {}
    urls = [u.strip() for u in nats_url.split(",") if u.strip()] if not nats_url.startswith("local:") else []
    for i, url in enumerate(urls):
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        if not parts.hostname:
            continue
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        tls = parts.scheme == "tls"
        servers[f"nats{i}" if i else "nats"] = {
            "host": f"{host}:{parts.port or 4222}",
            "protocol": "nats",
            "description": "NATS with JetStream" + (" over TLS (tls://)" if tls else ""),
            "security": security,
        }
    if not servers:
        servers["nats"] = {
            "host": "{host}",
            "protocol": "nats",
            "description": (
                "NATS with JetStream. The manifest names no server: pods use NATS_URL; `aiwfe up` "
                "writes the URL of the server it started to <data-dir>/system.json."
            ),
            "variables": {"host": {"default": "localhost:4222", "description": "host:port of a NATS server"}},
            "security": security,
        }
    return servers


def document(
    pods: Mapping[str, Iterable[type[Plugin]]],
    *,
    prefix: str = "aiwfe",
    name: str = "aiwfe",
    nats_url: str = "",
    notes: Iterable[str] = (),
    users: Mapping[str, Permissions] | None = None,
) -> dict[str, object]:
    """Build the AsyncAPI 3.0.0 document (a JSON-ready dict) of a layout.

    ``pods`` maps pod name → plugin classes; ``prefix`` is the subject prefix; ``nats_url``
    the manifest's ``system.nats_url`` (hosts only go into ``servers``); ``notes`` are
    appended to the description (e.g. plugins that could not be loaded); ``users`` the NATS
    users of the layout's authorization (:func:`aiwfe.kernel.tools.natsauth.permissions`): each
    operation then lists those that may publish to its subject in ``x-aiwfe-publishers``.
    """
    s = surface(pods)
    parts = Parts(prefix)
    for contract in sorted(s.requests, key=address_of):
        parts.rpc(contract, sorted(s.requests[contract]), sorted(s.callers.get(contract, ())))
    jobs = sorted(s.jobs, key=address_of)
    for contract in jobs:
        parts.job(contract, sorted(s.jobs[contract]))
    for contract in sorted(set(s.event_subscribers) | set(s.event_emitters), key=address_of):
        parts.event(contract, sorted(s.event_emitters.get(contract, ())), sorted(s.event_subscribers.get(contract, ())))
    results = [rt for c in jobs if (rt := reply_type(c)) is not None]
    parts.job_events(sorted(s.job_events, key=address_of), results, sorted({p for c in jobs for p in s.jobs[c]}))
    parts.status(sorted(pods))
    if users is not None:
        for op in parts.operations.values():
            address = parts.channels[op["channel"]["$ref"].rsplit("/", 1)[1]]["address"]
            op["x-aiwfe-publishers"] = publishers(users, address.replace("{job_id}", "0"))
    try:
        version = importlib.metadata.version("aiwfe")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    description = (
        f"The NATS subjects of the `{name}` system (subject prefix `{prefix}`), generated from the "
        "contracts its plugins declare. Pods talk msgpack among themselves; external publishers send "
        "JSON (`Content-Type: application/json`) to the submit and status subjects and get JSON back. "
        "A reply that carries an `Aiwfe-Error` header has an empty body: the header holds the error "
        "as JSON `{type, message, retryable, retry_after_s?}`. `x-aiwfe-access` says which roles may "
        "publish (`pods`: the pods' NATS users; `publisher`: also the external-publisher role; the "
        "operator's `admin` user may publish anything under the prefix); `x-aiwfe-publishers` names the "
        "NATS users of the rendered authorization that may."
    )
    for note in notes:
        description += f"\n\n{note}"
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": f"urn:aiwfe:{name}:{prefix}",
        "info": {"title": f"{name} bus", "version": version, "description": description},
        "defaultContentType": "application/json",
        "servers": _servers(nats_url),
        "channels": parts.channels,
        "operations": parts.operations,
        "components": parts.components(),
    }


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` one or more at the end."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(pat) == len(sub)


def publishers(users: Mapping[str, Permissions], subject: str) -> list[str]:
    """The users whose permissions allow publishing to ``subject`` (and do not deny it)."""
    return sorted(
        user
        for user, perm in users.items()
        if any(_matches(p, subject) for p in perm.publish) and not any(_matches(p, subject) for p in perm.publish_deny)
    )


def _users(manifest: Manifest) -> tuple[Mapping[str, Permissions] | None, list[str]]:
    try:
        return permissions(manifest), []
    except ConfigError as e:
        return None, [f"No NATS users listed: {e.message}"]


def _load(names: Iterable[str]) -> tuple[dict[str, type[Plugin]], list[str]]:
    installed = discover()
    classes: dict[str, type[Plugin]] = {}
    problems: list[str] = []
    for pname in names:
        if pname in classes:
            continue
        try:
            cls = resolve(pname, installed)
        except LookupError as e:
            problems.append(str(e))
            continue
        except Exception as e:  # an import failure is reported, not raised (as aiwfe check does)
            problems.append(f"plugin {pname}: failed to import: {e!r}")
            continue
        found = validate_plugin_class(cls)
        if found:
            problems.extend(found)
        else:
            classes[pname] = cls
    return classes, problems


def for_manifest(manifest: Manifest) -> dict[str, object]:
    """The document of a manifest's system.

    Raises:
        ConfigError: a plugin the manifest names cannot be loaded (every one listed).
    """
    classes, problems = _load(p for pod in manifest.pods.values() for p in pod.plugins)
    if problems:
        raise ConfigError(f"{manifest.source or 'manifest'}: " + "; ".join(problems))
    pods = {name: [classes[p] for p in pod.plugins] for name, pod in manifest.pods.items()}
    sys_ = manifest.system
    users, notes = _users(manifest)
    return document(pods, prefix=sys_.subject_prefix, name=sys_.name, nats_url=sys_.nats_url, users=users, notes=notes)


def for_pods(pods: Mapping[str, Iterable[str]], *, prefix: str, name: str = "aiwfe") -> dict[str, object]:
    """The document of a running system: ``pods`` maps pod name → plugin names (as the pods
    report them); plugins this process cannot load are left out and named in the description."""
    pods = {k: list(v) for k, v in pods.items()}
    classes, problems = _load(p for plugins in pods.values() for p in plugins)
    layout = {pod: [classes[p] for p in plugins if p in classes] for pod, plugins in pods.items()}
    notes = [f"Generated from the running pods ({', '.join(sorted(pods)) or 'none answered'})."]
    notes += [f"Left out: {p}" for p in problems]
    loaded = {pod: [p for p in plugins if p in classes] for pod, plugins in pods.items()}
    users, more = _users(Manifest(pods={k: Pod(plugins=v) for k, v in loaded.items()}, system=System(subject_prefix=prefix)))
    return document(layout, prefix=prefix, name=name, notes=notes + more, users=users)


class _PodsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pods: dict[str, list[str]]
    prefix: str
    name: str = "aiwfe"


def main() -> int:
    """``python -m aiwfe.kernel.tools.asyncapi``: read ``{"pods", "prefix", "name"?}`` as JSON on
    stdin, write :func:`for_pods`' document as JSON on stdout (how the gateway builds it in a
    child process, so the plugins it loads stay out of the gateway's own process)."""
    req = msgspec.json.decode(sys.stdin.buffer.read(), type=_PodsRequest)
    sys.stdout.buffer.write(msgspec.json.encode(for_pods(req.pods, prefix=req.prefix, name=req.name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
