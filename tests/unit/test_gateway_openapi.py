"""The gateway's machine-readable descriptions: OpenAPI at ``/schema`` (security schemes,
typed answers, error statuses with their headers, SSE) and the AsyncAPI document at
``GET /v1/asyncapi.json`` (built from the pods' status answers)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import Forbidden, Overloaded, RemoteError, Unavailable
from aiwfe.plugins.gateway.app import build_app, http_error
from aiwfe.plugins.gateway.busdoc import BusDocument
from aiwfe.plugins.gateway.config import GatewayConfig
from aiwfe.plugins.gateway.hub import Hub
from aiwfe.plugins.gateway.services import GatewayServices
from tests.support.gateway import gateway_manifest, run_system

PROTECTED = {
    ("/v1/auth/logout", "post"),
    ("/v1/jobs", "post"),
    ("/v1/jobs/{job_id}", "get"),
    ("/v1/jobs/{job_id}/events", "get"),
    ("/v1/memory", "post"),
    ("/v1/memory/recall", "post"),
    ("/v1/admin/users/{username}/disable", "post"),
    ("/v1/admin/users/{username}/enable", "post"),
    ("/v1/admin/users/{username}", "delete"),
    ("/v1/admin/dead-letters", "get"),
    ("/v1/admin/dead-letters/{job_id}/replay", "post"),
    ("/v1/console/me", "get"),
    ("/v1/console/jobs", "get"),
    ("/v1/console/jobs", "post"),
    ("/v1/console/jobs/{job_id}", "get"),
}


class StatusKernel:
    """Answers ``cluster_status`` like a running system (counts the calls)."""

    def __init__(self, statuses: list[Any]) -> None:
        self.statuses = statuses
        self.calls = 0

    async def cluster_status(self, timeout_s: float = 0.5) -> list[Any]:
        self.calls += 1
        await asyncio.sleep(0)
        return self.statuses


def _app(kernel: Any = None) -> Any:
    return build_app(GatewayServices(kernel, GatewayConfig(), Hub(), {}))


async def test_openapi_names_the_security_scheme_errors_and_sse() -> None:
    async with AsyncTestClient(_app()) as c:
        r = await c.get("/schema/openapi.json")
        assert r.status_code == 200
        api = r.json()
    schemes = api["components"]["securitySchemes"]
    assert schemes["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearer"]["description"],
    }
    assert schemes["token"]["in"] == "query"
    paths = api["paths"]
    for path, item in paths.items():
        for method, op in item.items():
            if (path, method) in PROTECTED:
                assert op["security"] == [{"bearer": []}, {"token": []}], (path, method)
                assert "401" in op["responses"], (path, method)
            else:
                assert "security" not in op, (path, method)
    jobs = paths["/v1/jobs"]["post"]["responses"]
    assert {"202", "400", "401", "403", "413", "503"} <= set(jobs)
    assert jobs["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobAccepted"}
    assert jobs["503"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    login_errors = paths["/v1/auth/login"]["post"]["responses"]
    assert login_errors["429"]["headers"]["Retry-After"]["schema"]["minimum"] == 1
    assert "WWW-Authenticate" in login_errors["401"]["headers"]
    assert "WWW-Authenticate" in jobs["401"]["headers"]
    error = jobs["413"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/ErrorBody")
    assert {"status_code", "detail"} <= set(api["components"]["schemas"]["ErrorBody"]["properties"])
    sse = paths["/v1/jobs/{job_id}/events"]["get"]
    assert list(sse["responses"]["200"]["content"]) == ["text/event-stream"]
    assert "204" in sse["responses"]
    assert {"404", "503"} <= set(paths["/v1/jobs/{job_id}"]["get"]["responses"])
    # typed answers instead of free-form objects
    login = paths["/v1/auth/login"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert login == {"$ref": "#/components/schemas/TokenBody"}
    assert "Retry-After" not in paths["/ready"]["get"]["responses"]["503"].get("headers", {})
    assert "/v1/asyncapi.json" in paths


def test_errors_map_to_the_documented_statuses() -> None:
    assert http_error(Forbidden("job x belongs to someone else"), 1.0).status_code == 403
    limited = http_error(RemoteError("TooManyAttempts", "locked", retry_after_s=2.5), 1.0)
    assert limited.status_code == 429 and limited.headers == {"Retry-After": "3"}
    busy = http_error(Overloaded("full"), 0.2)
    assert busy.status_code == 503 and busy.headers == {"Retry-After": "1"}
    bad = http_error(RemoteError("InvalidToken", "expired"), 1.0)
    assert bad.status_code == 401 and bad.headers == {"WWW-Authenticate": "Bearer"}
    # another plugin error: its type only, never its message (a database's error text, say)
    leak = http_error(RemoteError("DataError", 'PostgreSQL text fields cannot contain NUL (0x00) bytes, table "x"'), 1.0)
    assert leak.status_code == 502 and leak.detail == "remote_error: DataError"


async def test_the_gateway_serves_the_running_systems_asyncapi_document() -> None:
    kernel = StatusKernel(
        [
            {"pod": "edge", "plugins": ["gateway", "auth"], "ready": True, "prefix": "t7"},
            {"pod": "brain", "plugins": ["memory", "os:system", "x" * 500], "ready": True, "prefix": "t7"},
            "not a status",
            {"pod": 5},
        ]
    )
    async with AsyncTestClient(_app(kernel)) as c:
        r = await c.get("/v1/asyncapi.json")
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
        doc = r.json()
        again = await c.get("/v1/asyncapi.json")
        assert again.json() == doc
    assert kernel.calls == 1  # cached
    assert doc["asyncapi"] == "3.0.0"
    assert doc["channels"]["rpc-memory.recall"]["address"] == "t7.memory.recall"
    assert doc["operations"]["rpc-memory.recall"]["x-aiwfe-served-by"] == ["brain"]
    assert doc["operations"]["rpc-auth.verify"]["x-aiwfe-served-by"] == ["edge"]
    assert "os:system" not in str(doc)  # never imported from a name another process sent


async def test_the_document_is_rebuilt_only_when_it_is_old_and_the_layout_changed() -> None:
    kernel = StatusKernel([{"pod": "a", "plugins": ["memory"], "prefix": "p"}])
    doc = BusDocument(kernel, ttl_s=0.0)
    first = await doc.body()
    assert await doc.body() is first  # same layout: the same bytes, not rebuilt
    kernel.statuses = [{"pod": "a", "plugins": ["memory", "learning"], "prefix": "p"}]
    assert b"p.learning.feedback" in await doc.body()
    assert kernel.calls == 3


@pytest.mark.parametrize("statuses", [[], [{"pod": "a", "plugins": "memory"}]])
async def test_no_answering_pod_gives_an_empty_but_valid_document(statuses: list[Any]) -> None:
    doc = json.loads(await BusDocument(StatusKernel(statuses)).body())
    assert doc["asyncapi"] == "3.0.0" and "status-job" in doc["channels"]


async def test_a_build_that_cannot_finish_answers_503() -> None:
    kernel = StatusKernel([{"pod": "a", "plugins": ["memory"], "prefix": "p"}])
    with pytest.raises(Unavailable, match="longer than"):  # the child process is killed
        await BusDocument(kernel, build_timeout_s=0.001).body()
    async with AsyncTestClient(_app(kernel)) as c:
        assert (await c.get("/v1/asyncapi.json")).status_code == 200


async def test_a_running_gateway_describes_its_system(prefix: str) -> None:
    async with run_system(gateway_manifest(prefix), LocalBus(prefix)) as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.get("/v1/asyncapi.json")
        assert r.status_code == 200, r.text
        doc = r.json()
    channels = doc["channels"]
    assert channels["rpc-probe.ask"]["address"] == f"{prefix}.probe.ask"  # a plugin named module:Class
    assert channels["submit-probe.crunch"]["address"] == f"{prefix}.submit.probe.crunch"
    assert channels["rpc-perception.perceive"]["address"] == f"{prefix}.perception.perceive"
    assert doc["operations"]["rpc-probe.ask"]["x-aiwfe-served-by"] == ["edge"]
