"""The gateway under Granian's embedded server (``server = "granian"``, extra ``aiwfe[granian]``).

The same WebSocket behaviours that do not depend on the server's protocol layer:
refusal before accept, frames, the gateway's own frame-size check (1009), revocation.
Granian is part of the ``dev`` extra, so these run (a missing granian fails, never skips).
"""

from __future__ import annotations

import json

import granian  # noqa: F401  (installed with the dev extra: fail, do not skip, without it)
import httpx

from tests.support.gateway import recv_json, ws_connect
from tests.unit.test_gateway_http import StartGateway, bearer, login
from tests.unit.test_gateway_http import gateway as gateway  # the fixture
from tests.unit.test_gateway_ws import _closed_with, _expect_refused

GRANIAN = 'server = "granian"'


async def test_granian_refuses_before_accept_and_serves_frames(gateway: StartGateway) -> None:
    async with gateway(GRANIAN) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.get("/health")).json() == {"status": "ok"}
        token = await login(c)
        await _expect_refused(s.ws_url, None)
        await _expect_refused(s.ws_url, "not-a-jwt")
        async with ws_connect(s.ws_url, token, how="subprotocol") as ws:
            assert ws.subprotocol == "bearer"
            await ws.send(json.dumps({"type": "submit", "kind": "crunch", "input": {"n": 5}, "id": "a"}))
            frames = [await recv_json(ws)]
            while frames[-1]["type"] != "result":
                frames.append(await recv_json(ws))
            assert frames[0]["type"] == "accepted" and frames[-1]["result"]["square"] == 25


async def test_granian_frame_limit_and_revocation(gateway: StartGateway) -> None:
    async with gateway(GRANIAN + "\nmax_frame_bytes = 1024") as s, httpx.AsyncClient(base_url=s.url) as c:
        token = await login(c)
        async with ws_connect(s.ws_url, token) as big, ws_connect(s.ws_url, token) as other:
            await big.send(json.dumps({"type": "ping", "id": "x" * 4096}))
            assert await _closed_with(big) == 1009
            assert (await c.post("/v1/auth/logout", headers=bearer(token))).status_code == 200
            assert await _closed_with(other) == 4001
