"""Least-privilege NATS users derived from a manifest (DESIGN §1 "The bus is a public surface").

Users (``P`` is the manifest's subject prefix, streams ``<PFX>_JOBS`` ... as in
:func:`aiwfe.bus.codec.stream_names`):

* ``pod-<name>``, one per pod. Publishes the request and event subjects of what its
  plugins declare in ``calls``, the jobs, submit and status subjects of the kinds some pod
  of the manifest consumes, ``P.events.>`` and ``P.dlq.>`` (through JetStream),
  ``P.control.status`` / ``P.control.cancel``, liveness heartbeats to callers' inboxes
  (``_INBOX.*.*._alive``, see :mod:`aiwfe.bus.nats`), the results bucket (``$KV.<PFX>_RESULTS.>``)
  and the JetStream API calls the kernel makes on the P streams and the bucket, nothing
  else of it (no stream delete or purge); subscribes to what it serves (requests, events,
  ``P.submit.<kind>`` of the kinds it consumes, ``P.status.job``), ``P.control.>``,
  ``P.events.>`` and its own inbox ``_INBOX.pod-<name>.>``; may answer requests
  (``allow_responses``: one reply per request it received).
* ``publisher``, the external-publisher role: publishes ``P.submit.<kind>`` for the kinds
  the manifest consumes and ``P.status.job``; subscribes ``_INBOX.publisher.>``. No
  JetStream API, no bucket, no RPC or event subject: it reads outcomes and events as JSON
  through ``P.status.job``.
* ``admin``, the operator's shell tools (``aiwfe publish``, ``aiwfe dlq``): publishes
  anything under ``P.`` (jobs, RPCs, replays, cancels), the bucket and the same JetStream
  API calls as a pod; subscribes only its own inbox, so it can neither serve a subject
  nor read another user's replies.

Every user's inbox prefix is ``_INBOX.<user>`` (:func:`inbox_prefix`; NatsBus derives it
from the user in its URL), so no user can subscribe to another's replies. Passwords are
random 32-byte url-safe secrets kept in one file (mode 0600) and reused, so restarting
``aiwfe up`` keeps every credential. :func:`render_config` writes the nats-server
``authorization`` block; :func:`user_url` puts a user's credentials in a URL.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

from aiwfe.bus.codec import ALIVE_TOKEN, stream_names

from ..contract import address_of, kind_of
from ..errors import ConfigError
from ..manifest import Manifest
from ..plugin import handlers_of

__all__ = [
    "ADMIN",
    "PUBLISHER",
    "Permissions",
    "inbox_prefix",
    "load_passwords",
    "permissions",
    "pod_user",
    "render_config",
    "user_url",
]

ADMIN = "admin"
PUBLISHER = "publisher"
#: How long a pod may take to answer a request it received (nats-server ``allow_responses``).
RESPONSE_WINDOW = "15m"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Permissions(msgspec.Struct, frozen=True):
    """One user's NATS permissions (``allow_responses``: may answer requests it received)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False


def pod_user(pod: str) -> str:
    """The NATS user of pod ``pod``: ``pod-<pod>``."""
    return f"pod-{pod}"


def inbox_prefix(user: str) -> str:
    """The inbox prefix of ``user``: ``_INBOX.<user>`` (only that user may subscribe below it)."""
    return f"_INBOX.{user}"


class _Pod(msgspec.Struct):
    serves: set[str] = msgspec.field(default_factory=set)  # request subjects
    hears: set[str] = msgspec.field(default_factory=set)  # event subjects it subscribes to
    consumes: set[str] = msgspec.field(default_factory=set)  # job kinds
    calls: set[str] = msgspec.field(default_factory=set)  # request and event subjects it publishes


def _surface(manifest: Manifest) -> dict[str, _Pod]:
    """What every pod serves, hears, consumes and calls, from its plugin classes."""
    from ..registry import discover, resolve

    installed = discover()
    p = manifest.system.subject_prefix
    out: dict[str, _Pod] = {}
    for name, pod in manifest.pods.items():
        if not _NAME.match(name):
            raise ConfigError(f"pod {name!r}: a pod name may hold only letters, digits, '-' and '_' (it names a NATS user)")
        s = out[name] = _Pod()
        for plugin in pod.plugins:
            try:
                cls = resolve(plugin, installed)
            except (LookupError, ImportError) as e:
                raise ConfigError(f"pod {name}: plugin {plugin}: {e}") from None
            for h in handlers_of(cls):
                if h.kind == "request":
                    s.serves.add(f"{p}.{h.address}")
                elif h.kind == "event":
                    s.hears.add(f"{p}.{h.address}")
                elif h.kind == "job":
                    s.consumes.add(h.address)
            for c in cls.calls:
                if kind_of(c) != "job":  # jobs go through the jobs stream (below)
                    s.calls.add(f"{p}.{address_of(c)}")
    return out


def _jetstream(prefix: str) -> list[str]:
    """The JetStream API subjects nats-py 2.16 uses for the kernel's streams and bucket."""
    n = stream_names(prefix)
    streams = [n["jobs"], n["events"], n["dlq"], f"KV_{n['results']}"]
    api = "$JS.API"
    out = [f"{api}.INFO", f"{api}.STREAM.NAMES"]
    for s in streams:
        out += [
            f"{api}.STREAM.INFO.{s}",
            f"{api}.STREAM.CREATE.{s}",
            f"{api}.STREAM.UPDATE.{s}",
            f"{api}.STREAM.MSG.GET.{s}",
            f"{api}.DIRECT.GET.{s}",
            f"{api}.DIRECT.GET.{s}.>",
            f"{api}.CONSUMER.CREATE.{s}",
            f"{api}.CONSUMER.CREATE.{s}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{s}.>",
            f"{api}.CONSUMER.INFO.{s}.>",
            f"{api}.CONSUMER.DELETE.{s}.>",
            f"{api}.CONSUMER.MSG.NEXT.{s}.>",
            f"$JS.ACK.{s}.>",
        ]
    out += [f"{api}.STREAM.MSG.DELETE.{n['dlq']}", "$JS.FC.>", f"$KV.{n['results']}.>"]
    return out


_NEVER = ("$SYS.>", "$JS.API.STREAM.DELETE.>", "$JS.API.STREAM.PURGE.>", "$JS.API.ACCOUNT.>")


def permissions(manifest: Manifest) -> dict[str, Permissions]:
    """Every user of ``manifest`` (``pod-<name>`` for each pod, ``publisher``, ``admin``) → its permissions.

    Raises:
        ConfigError: a pod name that cannot name a user, or a plugin that does not load.
    """
    p = manifest.system.subject_prefix
    surface = _surface(manifest)
    kinds = sorted({k for s in surface.values() for k in s.consumes})
    js = _jetstream(p)
    kernel_pub = [
        *(f"{p}.jobs.{k}" for k in kinds),
        *(f"{p}.submit.{k}" for k in kinds),
        f"{p}.status.job",
        f"{p}.events.>",
        f"{p}.dlq.>",
        f"{p}.control.status",
        f"{p}.control.cancel",
        f"_INBOX.*.*.{ALIVE_TOKEN}",  # liveness heartbeats to callers' request muxes (aiwfe.bus.nats)
    ]
    out: dict[str, Permissions] = {}
    for name, s in surface.items():
        user = pod_user(name)
        out[user] = Permissions(
            publish=tuple(sorted(s.calls)) + tuple(kernel_pub) + tuple(js),
            subscribe=(
                *sorted(s.serves | s.hears),
                *(f"{p}.submit.{k}" for k in sorted(s.consumes)),
                f"{p}.status.job",
                f"{p}.control.>",
                f"{p}.events.>",
                f"{inbox_prefix(user)}.>",
            ),
            publish_deny=_NEVER,
            allow_responses=True,
        )
    out[PUBLISHER] = Permissions(
        publish=(*(f"{p}.submit.{k}" for k in kinds), f"{p}.status.job"),
        subscribe=(f"{inbox_prefix(PUBLISHER)}.>",),
        publish_deny=(*_NEVER, "$JS.>", "$KV.>", "_INBOX.>"),
    )
    out[ADMIN] = Permissions(
        publish=(f"{p}.>", *js),
        subscribe=(f"{inbox_prefix(ADMIN)}.>",),
        publish_deny=_NEVER,
    )
    return out


def load_passwords(path: Path, users: list[str]) -> dict[str, str]:
    """The password of each of ``users``, from the JSON file ``path`` (created mode 0600).

    Users missing from the file get a new random 32-byte url-safe secret; existing ones
    keep theirs, so a restart keeps every credential.
    """
    known: dict[str, str] = {}
    if path.exists():
        try:
            known = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise ConfigError(f"{path}: not a JSON object of NATS passwords ({e}); delete it to generate new ones") from None
    missing = [u for u in users if not known.get(u)]
    if missing or not path.exists():
        for u in missing:
            known[u] = secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh, indent=1)
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return {u: known[u] for u in users}


def authorization(perms: dict[str, Permissions], passwords: dict[str, str]) -> dict[str, object]:
    """The nats-server ``authorization`` block (as a dict) for these users."""
    users = []
    for user, perm in perms.items():
        pub: dict[str, object] = {"allow": list(perm.publish)}
        if perm.publish_deny:
            pub["deny"] = list(perm.publish_deny)
        entry: dict[str, object] = {"publish": pub, "subscribe": {"allow": list(perm.subscribe)}}
        if perm.allow_responses:
            entry["allow_responses"] = {"max": 1, "expires": RESPONSE_WINDOW}
        users.append({"user": user, "password": passwords[user], "permissions": entry})
    return {"users": users}


def render_config(perms: dict[str, Permissions], passwords: dict[str, str]) -> str:
    """nats-server configuration text holding the ``authorization`` block (JSON syntax, which
    the server's parser reads; quoted strings keep ``$JS...`` literal)."""
    return "authorization: " + json.dumps(authorization(perms, passwords), indent=1) + "\n"


def user_url(url: str, user: str, password: str) -> str:
    """``url`` (several: comma-separated) with ``user:password@`` in each server's address."""
    out = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            continue
        u = urlsplit(part if "://" in part else f"nats://{part}")
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{u.netloc.rpartition('@')[2]}"
        out.append(urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment)))
    return ",".join(out)
