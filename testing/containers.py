"""testcontainers for the servers of :mod:`aiwfe.testing.servers`: configured here, started by the caller.

Only current, non-deprecated modules: ``testcontainers.community.postgres`` /
``.redis`` / ``.qdrant`` (``testcontainers.postgres`` and ``testcontainers.redis`` warn
``DeprecationWarning`` in 4.15) and, for NATS, a plain ``DockerContainer`` with a
``LogMessageWaitStrategy`` (``testcontainers.community.nats`` is built on the deprecated
``@wait_container_is_ready`` and warns when imported). So the container path runs under
``filterwarnings = error``. Images come from the environment (``AIWFE_TEST_NATS_IMAGE`` ...)
or the defaults below; ``docker_client_kw`` goes to the Docker client (``{"version": "1.44"}``
lets a test configure a container without a Docker engine: no request is made until ``start``).
"""

from __future__ import annotations

import os
import secrets
from typing import Any

__all__ = ["IMAGES", "container_url", "image", "nats_container", "postgres_container", "qdrant_container", "redis_container"]

#: The default image of each service; ``AIWFE_TEST_<SERVICE>_IMAGE`` overrides one.
IMAGES = {"nats": "nats:2.10", "postgres": "postgres:16", "redis": "redis:7", "qdrant": "qdrant/qdrant:v1.16.2"}
NATS_USER = "aiwfe-test"


def image(service: str) -> str:
    """The image for ``service``: ``AIWFE_TEST_<SERVICE>_IMAGE`` or :data:`IMAGES`."""
    return os.environ.get(f"AIWFE_TEST_{service.upper()}_IMAGE") or IMAGES[service]


def nats_container(img: str | None = None, **kw: Any) -> Any:
    """A nats-server with JetStream that requires a user (``aiwfe-test``, a random password,
    kept on the object as ``aiwfe_password``): anonymous connections are refused, as in production."""
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    password = secrets.token_urlsafe(24)
    c: Any = DockerContainer(img or image("nats"), **kw)
    c.with_command(["-js", "--user", NATS_USER, "--pass", password]).with_exposed_ports(4222)
    c.waiting_for(LogMessageWaitStrategy("Server is ready"))
    c.aiwfe_password = password
    return c


def postgres_container(img: str | None = None, **kw: Any) -> Any:
    """PostgreSQL (user, password and database ``test``; URL without a SQLAlchemy driver)."""
    from testcontainers.community.postgres import PostgresContainer

    return PostgresContainer(img or image("postgres"), driver=None, **kw)


def redis_container(img: str | None = None, **kw: Any) -> Any:
    """Redis (or any image speaking its protocol: ``valkey/valkey:8`` works too)."""
    from testcontainers.community.redis import RedisContainer

    return RedisContainer(img or image("redis"), **kw)


def qdrant_container(img: str | None = None, **kw: Any) -> Any:
    """A Qdrant server (REST on 6333)."""
    from testcontainers.community.qdrant import QdrantContainer

    return QdrantContainer(img or image("qdrant"), **kw)


def container_url(service: str, c: Any) -> str:
    """The URL a client of ``service`` uses for the started container ``c``."""
    host = c.get_container_host_ip()
    if service == "nats":
        from aiwfe.kernel.tools.natsauth import user_url

        return user_url(f"nats://{host}:{c.get_exposed_port(4222)}", NATS_USER, c.aiwfe_password)
    if service == "postgres":
        return str(c.get_connection_url())
    if service == "redis":
        return f"redis://{host}:{c.get_exposed_port(6379)}/0"
    if service == "qdrant":
        return f"http://{host}:{c.get_exposed_port(6333)}"
    raise ValueError(f"unknown service {service!r}")
