"""aiwfe.testing's server selection and testcontainers configuration (no Docker engine needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aiwfe.testing import ServerUnavailable, servers, service
from aiwfe.testing import containers as tc

NO_DOCKER = {"version": "1.44"}  # a pinned API version: the Docker client makes no request until start()


@pytest.mark.parametrize(
    "module",
    [
        "aiwfe.testing",
        "aiwfe.testing.plugin",
        "aiwfe.testing.containers",
        "testcontainers.core.container",
        "testcontainers.core.wait_strategies",
        "testcontainers.community.postgres",
        "testcontainers.community.redis",
        "testcontainers.community.qdrant",
    ],
)
def test_the_container_path_imports_cleanly_with_warnings_as_errors(module: str) -> None:
    subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"], check=True, capture_output=True, cwd="/")


@pytest.mark.parametrize("module", ["testcontainers.postgres", "testcontainers.redis", "testcontainers.community.nats"])
def test_the_modules_we_avoid_do_warn(module: str) -> None:
    """Why containers.py uses testcontainers.community.* and a plain DockerContainer for NATS (4.15)."""
    r = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"], capture_output=True, text=True, cwd="/")
    assert r.returncode != 0 and "DeprecationWarning" in r.stderr


def test_containers_are_configured_without_starting_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIWFE_TEST_POSTGRES_IMAGE", "postgres:17-alpine")
    made = []
    try:
        nats = tc.nats_container(docker_client_kw=NO_DOCKER)
        made.append(nats)
        assert nats.image == "nats:2.10" and list(nats.ports) == ["4222"]
        assert nats._command[:3] == ["-js", "--user", tc.NATS_USER] and nats._command[4] == nats.aiwfe_password
        assert type(nats._wait_strategy).__name__ == "LogMessageWaitStrategy"
        pg = tc.postgres_container(docker_client_kw=NO_DOCKER)
        made.append(pg)
        assert pg.image == "postgres:17-alpine" and list(pg.ports) == ["5432"] and pg.driver == ""
        redis = tc.redis_container("valkey/valkey:8", docker_client_kw=NO_DOCKER)
        made.append(redis)
        assert redis.image == "valkey/valkey:8" and list(redis.ports) == ["6379"]
        qdrant = tc.qdrant_container(docker_client_kw=NO_DOCKER)
        made.append(qdrant)
        assert qdrant.image == tc.IMAGES["qdrant"] and set(qdrant.ports) == {"6333", "6334"}
    finally:
        for c in made:
            c._docker.client.close()


class _Started:
    """What container_url reads from a started container."""

    aiwfe_password = "p@ss"

    def get_container_host_ip(self) -> str:
        return "10.0.0.2"

    def get_exposed_port(self, port: int) -> int:
        return port + 40000

    def get_connection_url(self) -> str:
        return "postgresql://test:test@10.0.0.2:45432/test"


@pytest.mark.parametrize(
    ("name", "url"),
    [
        ("nats", "nats://aiwfe-test:p%40ss@10.0.0.2:44222"),
        ("postgres", "postgresql://test:test@10.0.0.2:45432/test"),
        ("redis", "redis://10.0.0.2:46379/0"),
        ("qdrant", "http://10.0.0.2:46333"),
    ],
)
def test_container_urls(name: str, url: str) -> None:
    assert tc.container_url(name, _Started()) == url


@pytest.fixture
def no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(servers, "docker_unavailable_reason", lambda: "no Docker engine (test)")


@pytest.mark.parametrize("name", ["nats", "postgres", "redis", "qdrant"])
def test_a_url_from_the_environment_comes_first(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(servers.ENV_VARS[name], "scheme://from-env:1")
    with service(name, tmp_path) as url:
        assert url == "scheme://from-env:1"


def test_a_forced_source_that_fails_names_what_it_tried(no_docker: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QDRANT_URL", raising=False)
    with pytest.raises(ServerUnavailable, match=r"tried env: QDRANT_URL is not set$"), service("qdrant", tmp_path, "env"):
        pass
    with pytest.raises(ServerUnavailable, match=r"--aiwfe-servers=containers\); tried containers: no Docker engine"):
        with service("postgres", tmp_path, "containers"):
            pass
    with pytest.raises(ValueError, match="not one of auto, env, containers, embedded"), service("redis", tmp_path, "docker"):
        pass


def test_auto_falls_through_to_a_container_when_docker_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.setattr(servers, "docker_unavailable_reason", lambda: None)
    seen: list[str] = []

    def fake_container(name: str, stack: Any) -> str:
        seen.append(name)
        return "http://container:6333"

    monkeypatch.setattr(servers, "_container", fake_container)
    with service("qdrant", tmp_path) as url:
        assert url == "http://container:6333" and seen == ["qdrant"]


def test_auto_without_docker_uses_the_embedded_vector_store(
    no_docker: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("QDRANT_URL", raising=False)
    with service("qdrant", tmp_path) as url:
        assert url == ""  # the memory plugin's embedded store


async def test_the_embedded_nats_requires_a_user(no_docker: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nats

    from tests.support.servers import nats_hello

    monkeypatch.delenv("NATS_URL", raising=False)
    with service("nats", tmp_path) as url:
        assert url.startswith(f"nats://{servers.TEST_USER}:")
        host, port = url.rpartition("@")[2].split(":")
        assert "Authorization Violation" in await nats_hello(host, int(port), None, None)
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        assert (await js.publish("t.x", b"1")).seq == 1
        await nc.close()


def test_pytest_help_lists_the_options(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert "--aiwfe-servers={auto,env,containers,embedded}" in out and "--aiwfe-seeds" in out
