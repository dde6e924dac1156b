"""A NATS cluster whose nodes run in network namespaces of their own, for partition tests.

Layout (made with ``ip``; needs root, or CAP_NET_ADMIN and CAP_SYS_ADMIN)::

    root namespace: bridge <tag>br 10.X.Y.1/24 ── <tag>Nh (veth) ══ <tag>Nn 10.X.Y.1N  namespace <tag>-nN

Every node is a ``nats-server`` with JetStream, started through ``ip netns exec`` in its own
namespace and listening (clients and routes) on its own address; the test process and the pods
stay in the root namespace and reach the nodes over the bridge. :meth:`NetnsCluster.cut` takes a
node's root-side link down (the node can reach nothing and nothing reaches it: a partition,
not a crash — the process keeps running and its TCP connections stall instead of closing);
:meth:`NetnsCluster.heal` brings it back. :func:`netns_unavailable_reason` says why namespaces
cannot be made here (the tests skip with it).

Nodes ping clients and routes every ``ping_interval_s`` (nats-server's default, 2 minutes, would
leave a stalled route undetected for minutes; production clusters tune it the same way).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

from aiwfe.kernel.tools.embedded import EmbeddedNats, nats_server_binary

__all__ = ["NetnsCluster", "NetnsNats", "netns_cluster", "netns_unavailable_reason"]


def _ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.returncode}")


def netns_unavailable_reason() -> str | None:
    """None when this process may make network namespaces, veth pairs and a bridge; otherwise why not."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"aiwfe-probe-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here ({r.stderr.strip() or r.returncode}); it needs root or CAP_SYS_ADMIN"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    tag = f"ap{uuid.uuid4().hex[:4]}"
    r = subprocess.run(
        ["ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b"], capture_output=True, text=True
    )
    if r.returncode != 0:
        return f"veth pairs cannot be made here ({r.stderr.strip() or r.returncode}); it needs CAP_NET_ADMIN"
    subprocess.run(["ip", "link", "del", f"{tag}a"], capture_output=True, timeout=10)
    return None


class NetnsNats(EmbeddedNats):
    """A clustered nats-server started inside network namespace ``netns``, on ``host`` (its own address)."""

    def __init__(self, data_dir: Path, host: str, netns: str, name: str, routes: list[str], *, config: str, ping_s: int) -> None:
        self.netns, self.name, self.routes = netns, name, routes
        self.cluster_port = 6222
        super().__init__(data_dir, 4222, host, config=config + f'ping_interval: "{ping_s}s"\nping_max: 2\n')

    def start(self, timeout_s: float = 10.0) -> NetnsNats:
        conf = self.data_dir / "nats-server.conf"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf.write_text(self.config or "")
        conf.chmod(0o600)
        argv = [
            "ip", "netns", "exec", self.netns, nats_server_binary(),
            "-c", str(conf), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.data_dir),
            "-n", self.name, "--cluster_name", "aiwfe", "--cluster", f"nats://{self.host}:{self.cluster_port}",
            "--routes", ",".join(self.routes),
        ]  # fmt: skip
        self._spawn(argv, timeout_s)
        return self


class NetnsCluster:
    """``size`` nodes, each in its own namespace (see the module docstring). ``nodes[i].url``
    is node i's client URL (no credentials), :attr:`urls` all of them comma-separated."""

    def __init__(self, data_dir: Path, size: int = 3, *, config: str = "", ping_s: int = 2) -> None:
        self.tag = f"a{uuid.uuid4().hex[:5]}"  # interface names stay under 16 characters
        net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.bridge, self.gateway = f"{self.tag}br", f"{net}.1"
        self.namespaces = [f"{self.tag}-n{i}" for i in range(size)]
        addrs = [f"{net}.{10 + i}" for i in range(size)]
        self.nodes = [
            NetnsNats(
                data_dir / f"n{i}", addrs[i], self.namespaces[i], f"n{i}",
                [f"nats://{a}:6222" for j, a in enumerate(addrs) if j != i], config=config, ping_s=ping_s,
            )
            for i in range(size)
        ]  # fmt: skip
        self._made: list[tuple[str, ...]] = []

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated."""
        return ",".join(n.url for n in self.nodes)

    def _host_end(self, i: int) -> str:
        return f"{self.tag}{i}h"

    def build(self) -> None:
        """Make the bridge, the namespaces and their links (undone by :meth:`destroy`)."""
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, (ns, node) in enumerate(zip(self.namespaces, self.nodes, strict=True)):
            _ip("netns", "add", ns)
            self._made.append(("netns", ns))
            host, inner = self._host_end(i), f"{self.tag}{i}n"
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            self._made.append(("link", host))
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", host, "master", self.bridge)
            _ip("link", "set", host, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{node.host}/24", "dev", inner, ns=ns)
            _ip("link", "set", inner, "up", ns=ns)

    def start(self) -> None:
        """Start every node (routes form in the background: wait for JetStream before use)."""
        for n in self.nodes:
            n.start()

    def cut(self, i: int) -> None:
        """Partition node ``i`` away from everything (its process keeps running)."""
        _ip("link", "set", self._host_end(i), "down")

    def heal(self, i: int) -> None:
        """Reconnect node ``i``."""
        _ip("link", "set", self._host_end(i), "up")

    def node_at(self, host: str) -> int:
        """The index of the node listening on ``host``."""
        return next(i for i, n in enumerate(self.nodes) if n.host == host)

    def destroy(self) -> None:
        """Kill the nodes and remove what :meth:`build` made (whatever part of it was made)."""
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.kill()
        for kind, name in reversed(self._made):
            subprocess.run(["ip", kind, "del", name], capture_output=True, timeout=10)
        self._made.clear()


@contextlib.contextmanager
def netns_cluster(data_dir: Path, size: int = 3, *, config: str = "") -> Iterator[NetnsCluster]:
    """A started :class:`NetnsCluster`, destroyed on exit (also when building it failed halfway)."""
    cluster = NetnsCluster(data_dir, size, config=config)
    try:
        cluster.build()
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()
