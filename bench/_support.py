"""Shared helpers for benchmarks: a NATS server to measure against, percentiles, output."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["cpu_s", "emit", "load_avg_1m", "nats_pid", "nats_server", "percentile", "raise_nofile", "stop_children"]


@contextlib.contextmanager
def nats_server(url: str | None) -> Iterator[str]:
    """Yield ``url`` when given, else the URL of a private embedded nats-server.

    Benchmarks default to their own embedded nats-server so that the system's server
    (and whatever else uses it) does not skew the figures.
    """
    if url:
        yield url
        return
    from aiwfe.kernel.tools.embedded import EmbeddedNats

    with tempfile.TemporaryDirectory(prefix="aiwfe-bench-") as d, EmbeddedNats(os.path.join(d, "nats")) as srv:
        yield srv.url


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(pct / 100 * (len(s) - 1))))
    return s[k]


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's final JSON line."""
    print(json.dumps(result), flush=True)


def load_avg_1m() -> float:
    """The machine's 1-minute load average (other work skews every figure; reported with them)."""
    return round(os.getloadavg()[0], 2)


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far; None off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nats_pid(url: str) -> int | None:
    """The pid of the nats-server listening on ``url``'s port on this machine (its CPU is part
    of every frame's cost), or None."""
    port = str(urlsplit(url).port)
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"nats-server") and port.encode() in args:
            return int(proc.name)
    return None


def stop_children(procs: list[subprocess.Popen[str]], quit_line: str | None = None, timeout_s: float = 30.0) -> None:
    """Ask each child to stop (``quit_line`` on its stdin, then stdin closed), wait for each,
    and kill one that has not ended within ``timeout_s``."""
    for p in procs:
        with contextlib.suppress(Exception):
            assert p.stdin is not None
            if quit_line is not None:
                p.stdin.write(quit_line)
            p.stdin.close()
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
