"""The gateway's protocol-edge tests over a real NATS server with the real auth plugin
(PostgreSQL + Redis): the bodies of tests/unit/test_gateway_edges.py, another fixture."""

from __future__ import annotations

import pytest

from tests.integration.test_gateway_http import nats_gateway
from tests.unit.test_gateway_edges import *  # noqa: F403  (the same test bodies, over NATS and the real auth)
from tests.unit.test_gateway_http import StartGateway

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


@pytest.fixture
def gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:  # overrides the LocalBus fixture
    """Start the one-pod gateway system on NATS with the real auth plugin."""
    return nats_gateway(prefix, nats_url, pg_url, redis_url)
