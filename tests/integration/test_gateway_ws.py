"""The gateway's WebSocket tests over a real NATS server with the real auth plugin
(PostgreSQL + Redis): the bodies of tests/unit/test_gateway_ws.py with other fixtures,
plus a check that the forged tokens differ from an accepted one in one way each."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_gateway_http import nats_gateway
from tests.support.gateway import real_auth_tokens, recv_json, ws_connect
from tests.unit.test_gateway_http import StartGateway
from tests.unit.test_gateway_ws import *  # noqa: F403  (the same test bodies)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


@pytest.fixture
def gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:  # type: ignore[no-redef]  # overrides
    """Start the one-pod gateway system on NATS with the real auth plugin."""
    return nats_gateway(prefix, nats_url, pg_url, redis_url)


@pytest.fixture
def forge() -> dict[str, str]:  # type: ignore[no-redef]  # overrides the double's tokens
    """Tokens the real auth plugin must refuse (signed for its key ring, each wrong in one way)."""
    tokens = real_auth_tokens()
    del tokens["valid"], tokens["short_lived"]
    return tokens


@pytest.fixture
def short_lived_token() -> str:  # type: ignore[no-redef]  # overrides the double's token
    """A token for the real auth plugin's key that expires in 2 s."""
    return real_auth_tokens()["short_lived"]


async def test_the_forged_tokens_differ_from_an_accepted_one_in_one_way(gateway: StartGateway) -> None:
    async with gateway() as s, ws_connect(s.ws_url, real_auth_tokens()["valid"]) as ws:
        await ws.send(json.dumps({"type": "ping", "id": "v"}))
        assert await recv_json(ws) == {"type": "pong", "id": "v"}
