"""Run a manifest's pods: in this process (:func:`running`, the one place tests start every pod
of a manifest in-process), or as child processes (``aiwfe run``), as production would.

A child imports what the test process can: its ``PYTHONPATH`` starts with the test process's
own import path (site-packages and the standard library left out), so ``module:Class`` plugins
of a test package load in the pods too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from aiwfe.bus.local import LocalBus
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.manifest import Manifest, parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.embedded import free_port

__all__ = ["PodProcess", "StartPods", "child_pythonpath", "dump_toml", "run_pods", "running", "start_pod", "wait_ready"]

#: The ``start_pods`` fixture: manifest TOML (``{prefix}`` filled in) → running pods by name.
StartPods = Callable[[str], contextlib.AbstractAsyncContextManager[dict[str, PodRunner]]]


def child_pythonpath() -> str:
    """``PYTHONPATH`` for a child: this process's ``sys.path`` entries outside the
    interpreter's own (site-packages, standard library), then the inherited ``PYTHONPATH``."""
    own = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries: list[str] = []
    for entry in sys.path:
        path = Path(entry or os.getcwd()).resolve()
        if path.is_dir() and not any(path == o or o in path.parents for o in own) and str(path) not in entries:
            entries.append(str(path))
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*entries, *([inherited] if inherited else [])])


@contextlib.asynccontextmanager
async def running(manifest: Manifest | str, *, nats_url: str | None = None) -> AsyncIterator[dict[str, PodRunner]]:
    """Start every pod of ``manifest`` (a Manifest or TOML text) in this process, in manifest
    order, and stop them in reverse. Without ``nats_url`` they share one LocalBus (one process,
    no NATS); with it each pod has its own NATS connection, as separate processes would."""
    m = parse_manifest(manifest, env={}) if isinstance(manifest, str) else manifest
    prefix = m.system.subject_prefix
    local = LocalBus(prefix) if nats_url is None else None
    pods = {name: PodRunner(m, name, local or NatsBus(nats_url or "", prefix, name=name), ops_port=0) for name in m.pods}
    async with contextlib.AsyncExitStack() as stack:
        for p in pods.values():
            await stack.enter_async_context(p)
        yield pods


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def dump_toml(data: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """Write a nested dict as TOML (enough for manifests: tables, scalars, lists)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict) and (
            not v or any(isinstance(x, dict) for x in v.values()) or path == () or path[0] in ("pods", "plugins")
        ):
            tables.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {_value(v)}")
    out = ""
    if path and lines:
        out += "[" + ".".join(json.dumps(p) for p in path) + "]\n"
    out += "".join(line + "\n" for line in lines)
    for k, v in tables:
        out += "\n" + dump_toml(v, (*path, k))
    return out


class PodProcess:
    """One ``aiwfe run`` child."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], ops_port: int, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.ops_port = ops_port
        self.log = log

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a path on the pod's ops port."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ops_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def ready(self) -> bool:
        """True when ``/ready`` answers 200."""
        try:
            return self.get("/ready")[0] == 200
        except OSError:
            return False


def start_pod(manifest: Path, name: str, env: dict[str, str], logdir: Path, cwd: Path | None = None) -> PodProcess:
    """Start one pod as ``aiwfe run`` (not waiting for it); output appended to ``logdir/NAME.log``.

    ``env`` adds to this process's environment; ``cwd`` defaults to the current directory."""
    full_env = {**os.environ, **env, "PYTHONPATH": child_pythonpath()}
    port = free_port()
    log = logdir / f"{name}.log"
    with open(log, "ab") as fh:
        p = subprocess.Popen(
            [sys.executable, "-m", "aiwfe.kernel.tools.cli", "run", "-m", str(manifest), "--pod", name, "--ops-port", str(port)],
            cwd=cwd or Path.cwd(), env=full_env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return PodProcess(name, p, port, log)


def wait_ready(pods: list[PodProcess], timeout_s: float = 30) -> None:
    """Block until every pod answers ``/ready`` with 200.

    Raises:
        RuntimeError: a pod exited or was not ready in time (with its log tail).
    """
    end = time.monotonic() + timeout_s
    for pp in pods:
        while not pp.ready():
            if pp.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"pod {pp.name} did not become ready:\n{pp.log.read_text()[-3000:]}")
            time.sleep(0.05)


@contextlib.contextmanager
def run_pods(
    manifest: Path,
    pods: list[str],
    env: dict[str, str],
    logdir: Path,
    timeout_s: float = 30,
    pod_env: Callable[[str], dict[str, str]] | None = None,
) -> Iterator[dict[str, PodProcess]]:
    """Start each pod as ``aiwfe run``, wait until every one is ready, SIGTERM them after.

    ``pod_env(name)`` adds to one pod's environment (its own NATS user's ``NATS_URL``, say).
    The yielded dict may be updated: a test that restarts a pod puts the new process in it.
    """
    procs: dict[str, PodProcess] = {}
    try:
        for name in pods:
            procs[name] = start_pod(manifest, name, {**env, **(pod_env(name) if pod_env else {})}, logdir)
        wait_ready(list(procs.values()), timeout_s)
        yield procs
    finally:
        for pp in procs.values():
            if pp.proc.poll() is None:
                pp.proc.send_signal(signal.SIGTERM)
        for pp in procs.values():
            try:
                pp.proc.wait(20)
            except subprocess.TimeoutExpired:
                pp.proc.kill()
                pp.proc.wait()
