"""The gateway's HTTP tests over a real NATS server with the real auth plugin
(PostgreSQL + Redis): the bodies of tests/unit/test_gateway_http.py, another fixture."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from aiwfe.bus.nats import NatsBus
from tests.support.gateway import GatewaySystem, gateway_manifest, real_auth_config, run_system
from tests.unit.test_gateway_http import *  # noqa: F403  (the same test bodies, over NATS and the real auth)
from tests.unit.test_gateway_http import StartGateway

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


def nats_gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:
    """A gateway starter on NATS with the real auth plugin (or ``auth``, a test double)."""

    @contextlib.asynccontextmanager
    async def start(extra: str = "", *, auth: str | None = None, more_plugins: str = "") -> AsyncIterator[GatewaySystem]:
        if auth is None:
            text = gateway_manifest(prefix, auth="auth", gateway=extra, auth_config=real_auth_config(pg_url, redis_url, prefix))
        else:
            text = gateway_manifest(prefix, auth=auth, gateway=extra)
        if more_plugins:
            text = text.replace('"reasoning"]', f'"reasoning", {more_plugins}]')
        async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s:
            yield s

    return start


@pytest.fixture
def gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:  # overrides the LocalBus fixture
    """Start the one-pod gateway system on NATS with the real auth plugin."""
    return nats_gateway(prefix, nats_url, pg_url, redis_url)
