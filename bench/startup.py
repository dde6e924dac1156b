"""``aiwfe bench startup``: time from process start to ready, per pod and for ``aiwfe up``.

* Each pod of the manifest (default ``manifests/consolidated.toml``) runs alone as
  ``python -m aiwfe.kernel.tools.cli run -m MANIFEST --pod NAME --ops-port P`` against a private
  embedded nats-server; the figure is the time from just before the process is spawned
  until ``/ready`` answers 200, the median of ``--runs`` starts. Goal: 2 s each.
  ``DATABASE_URL``/``REDIS_URL`` are taken from the environment, else the machine's
  PostgreSQL and Redis on their standard ports when they answer.
* ``python -m aiwfe.kernel.tools.cli up -m MANIFEST`` with no service URL in its environment, so it
  starts its embedded services, on a fresh data directory (``up_ready_s``) and again on
  the same one (``up_warm_ready_s``): the time until every pod process has logged that it
  is ready. Goal: 5 s.
* ``python_s``: starting ``python -c pass`` (the floor every figure stands on).

Pods start one at a time so that they do not compete for the same cores. Last line, one
JSON object: ``{"pods": {NAME: seconds}, "max_pod_ready_s", "up_ready_s", ...}``.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiwfe.kernel.tools.embedded import free_port

from ._support import emit, nats_server

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = "manifests/consolidated.toml"
POD_GOAL_S = 2.0
UP_GOAL_S = 5.0
_POLL_S = 0.005
_SERVICE_VARS = ("NATS_URL", "DATABASE_URL", "REDIS_URL", "QDRANT_URL")
_MACHINE_SERVICES = {
    "DATABASE_URL": (5432, "postgresql://postgres@127.0.0.1:5432/test"),
    "REDIS_URL": (6379, "redis://127.0.0.1:6379/0"),
}
# Logged by kernel.pod once a pod is ready (in `aiwfe up`'s output, prefixed with the pod label).
_READY_LINE = re.compile(r"pod (\S+) ready: plugins .*ops (http://\S+)")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False


def _machine_services() -> dict[str, str]:
    """``DATABASE_URL``/``REDIS_URL``: the environment's, else the machine's servers that answer."""
    env = {}
    for var, (port, url) in _MACHINE_SERVICES.items():
        if os.environ.get(var):
            env[var] = os.environ[var]
        elif _answers(port):
            env[var] = url
    return env


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM the process's group (it and the pods it spawned), SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _python_start_s(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pod_ready_s(manifest: str, pod: str, env: dict[str, str], timeout_s: float, log: Path) -> float:
    """Start one pod, return seconds until ``/ready`` is 200, stop it.

    Raises:
        RuntimeError: the pod exited or was not ready within ``timeout_s`` (with its log tail).
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "aiwfe.kernel.tools.cli", "run", "-m", manifest, "--pod", pod, "--ops-port", str(port)]
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while not _ready(url):
            if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"pod {pod} not ready after {time.perf_counter() - t0:.1f} s:\n{log.read_text()[-3000:]}")
            time.sleep(_POLL_S)
        return time.perf_counter() - t0
    finally:
        _stop(proc, 30)


def _up_ready_s(manifest: str, env: dict[str, str], data_dir: Path, expected: int, timeout_s: float, log: Path) -> float:
    """Run ``aiwfe up``, return seconds until ``expected`` pod processes logged ready, stop it.

    Raises:
        RuntimeError: ``up`` exited or was not ready within ``timeout_s`` (with its output tail).
    """
    cmd = [sys.executable, "-m", "aiwfe.kernel.tools.cli", "up", "-m", manifest, "--data-dir", str(data_dir)]
    ready: dict[str, float] = {}
    done = threading.Event()
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )  # fmt: skip

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            lines.append(line)
            m = _READY_LINE.search(line)
            if m:
                label = line.split("]", 1)[0] if line.startswith("[") else m.group(1)
                ready.setdefault(label, time.perf_counter() - t0)
                if len(ready) >= expected:
                    done.set()
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        done.wait(timeout_s)
        if len(ready) < expected:
            raise RuntimeError(
                f"aiwfe up: {len(ready)} of {expected} pod(s) ready after {time.perf_counter() - t0:.1f} s:\n"
                + "".join(lines)[-3000:]
            )
        return max(ready.values())
    finally:
        _stop(proc, 60)
        reader.join(5)
        log.write_text("".join(lines))


def run(manifest: str, runs: int, timeout_s: float, url: str | None, skip_up: bool) -> dict[str, Any]:
    """Measure; returns the result object (see the module docstring).

    A start that fails is reported as ``null`` with its reason under ``errors``; the
    other measurements still run.
    """
    from aiwfe.kernel.manifest import load_manifest

    m = load_manifest(ROOT / manifest)
    result: dict[str, Any] = {"pods": {}, "max_pod_ready_s": None, "up_ready_s": None}
    errors: dict[str, str] = {}
    base = {k: v for k, v in os.environ.items() if k not in _SERVICE_VARS}
    base["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    # A pod running auth needs a signing key, as it would get from its Secret in production.
    base.setdefault("JWT_SECRET", secrets.token_hex(32))
    services = _machine_services()
    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-startup-") as tmp, nats_server(url) as nats_url:
        logs = Path(tmp)
        env = {**base, **services, "NATS_URL": nats_url}
        for pod in m.pods:
            try:
                times = [_pod_ready_s(manifest, pod, env, timeout_s, logs / f"{pod}-{i}.log") for i in range(runs)]
                result["pods"][pod] = round(statistics.median(times), 3)
            except RuntimeError as e:
                result["pods"][pod] = None
                errors[pod] = str(e)
        measured = [t for t in result["pods"].values() if t is not None]
        result["max_pod_ready_s"] = max(measured) if len(measured) == len(m.pods) else None
        if not skip_up:
            expected = sum(p.replicas for p in m.pods.values())
            data_dir = logs / "up-data"
            try:
                cold = _up_ready_s(manifest, base, data_dir, expected, timeout_s, logs / "up-1.log")
                result["up_ready_s"] = round(cold, 3)
                warm = _up_ready_s(manifest, base, data_dir, expected, timeout_s, logs / "up-2.log")
                result["up_warm_ready_s"] = round(warm, 3)
            except RuntimeError as e:
                errors["up"] = str(e)
    result["python_s"] = round(_python_start_s(runs), 3)
    result["runs"] = runs
    result["manifest"] = manifest
    result["services"] = sorted(services)
    result["pod_goal_s"] = POD_GOAL_S
    result["up_goal_s"] = UP_GOAL_S
    pods_ok = result["max_pod_ready_s"] is not None and result["max_pod_ready_s"] <= POD_GOAL_S
    up_ok = skip_up or (result["up_ready_s"] is not None and result["up_ready_s"] <= UP_GOAL_S)
    result["ok"] = pods_ok and up_ok
    if errors:
        result["errors"] = {k: v.splitlines()[0] for k, v in errors.items()}
        for name, text in errors.items():
            print(f"--- {name}:\n{text}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print the JSON line; returns 0, or 1 when a start failed."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench startup", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-m", "--manifest", default=DEFAULT_MANIFEST, help=f"manifest (default {DEFAULT_MANIFEST})")
    p.add_argument("--runs", type=int, default=3, help="starts per pod; the median is reported (default 3)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one start may take before it counts as failed")
    p.add_argument("--url", help="NATS URL for the per-pod starts (default: a private embedded nats-server)")
    p.add_argument("--no-up", action="store_true", help="skip the `aiwfe up` measurement")
    a = p.parse_args(argv)
    result = run(a.manifest, a.runs, a.timeout, a.url, a.no_up)
    emit(result)
    return 1 if "errors" in result else 0


if __name__ == "__main__":
    sys.exit(main())
