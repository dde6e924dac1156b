"""The gateway's input validation over a real NATS server with the real auth plugin
(PostgreSQL + Redis): the bodies of tests/unit/test_gateway_validation.py, another fixture
(NATS's own max_payload decides what is too large for the bus)."""

from __future__ import annotations

import pytest

from tests.integration.test_gateway_http import nats_gateway
from tests.unit.test_gateway_http import StartGateway
from tests.unit.test_gateway_validation import *  # noqa: F403  (the same test bodies)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


@pytest.fixture
def gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:  # type: ignore[no-redef]  # overrides
    """Start the one-pod gateway system on NATS with the real auth plugin."""
    return nats_gateway(prefix, nats_url, pg_url, redis_url)
