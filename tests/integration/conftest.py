"""Fixtures of the integration tests that several modules share."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.auth import WHO, StartAuth
from tests.support.pods import StartPods, dump_toml, running


@pytest.fixture(params=["local", "nats"])
def bus_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def start_auth(bus_kind: str, prefix: str, request: pytest.FixtureRequest) -> StartAuth:
    """Start pods ``auth`` (the plugin) and ``client`` (another pod) on the chosen bus.

    ``auth_pods`` > 1 starts that many auth pods (``auth``, ``auth2``, ...) sharing the load.
    """
    nats_url = ""
    if bus_kind == "nats":
        nats_url = request.getfixturevalue("nats_url")
        request.getfixturevalue("cleanup_streams")

    @contextlib.asynccontextmanager
    async def start(cfg: dict[str, Any], auth_pods: int = 1) -> AsyncIterator[dict[str, PodRunner]]:
        pods_def: dict[str, Any] = {"client": {"plugins": [WHO]}}
        for i in range(auth_pods):
            pods_def["auth" if i == 0 else f"auth{i + 1}"] = {"plugins": ["auth"]}
        data = {"system": {"subject_prefix": prefix, "drain_timeout_s": 1}, "pods": pods_def, "plugins": {"auth": cfg}}
        m = parse_manifest(dump_toml(data), env={})
        async with running(m, nats_url=None if bus_kind == "local" else nats_url) as pods:
            yield pods

    return start


@pytest.fixture
def start_pods(prefix: str, nats_url: str) -> StartPods:
    """Start every pod of a manifest, each with its own NATS connection (so calls between
    pods cross the server); the integration twin of tests/unit/conftest.py's LocalBus one,
    which is how the unit test bodies imported here run over NATS."""

    @contextlib.asynccontextmanager
    async def start(text: str) -> AsyncIterator[dict[str, PodRunner]]:
        async with running(parse_manifest(text.replace("{prefix}", prefix), env={}), nats_url=nats_url) as pods:
            yield pods

    return start
