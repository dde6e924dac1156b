"""The gateway's OpenAPI description (``/schema``) beyond what Litestar infers from types.

* security schemes: ``bearer`` (HTTP bearer, the JWT from ``POST /v1/auth/login``) and
  ``token`` (the same token as ``?token=``, for EventSource, which cannot set headers); every
  route that takes a token dependency lists them in ``security`` and answers 401
  (:func:`document_security` derives both from the handlers' parameters, so a new protected
  route cannot be forgotten);
* the error statuses each route can answer (:func:`errors`), with Litestar's error body
  (:class:`ErrorBody`) and, added by :func:`document_security` because Litestar's
  ``ResponseSpec`` cannot carry headers, ``Retry-After`` on 429 and 503 and
  ``WWW-Authenticate: Bearer`` on 401;
* typed bodies of the routes' replies (the Structs below) and the SSE route as
  ``text/event-stream`` (:data:`SSE_RESPONSE`).
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Reference,
    Schema,
    SecurityScheme,
)

__all__ = [
    "BEARER",
    "ERRORS",
    "SECURITY",
    "SSE_RESPONSE",
    "ErrorBody",
    "Health",
    "LoggedOutBody",
    "MemoryStored",
    "PodStatus",
    "ReadyBody",
    "TokenBody",
    "UserBody",
    "document_security",
    "error_response",
    "errors",
    "openapi_config",
]

BEARER, QUERY_TOKEN = "bearer", "token"
SECURITY: list[dict[str, list[str]]] = [{BEARER: []}, {QUERY_TOKEN: []}]


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error answer (Litestar's): the status and what went wrong (the field, for a bad body)."""

    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None


class UserBody(msgspec.Struct, frozen=True):
    user_id: str
    username: str


class TokenBody(msgspec.Struct, frozen=True):
    """A bearer token: send it as ``Authorization: Bearer <access_token>``."""

    access_token: str
    token_type: str
    expires_in: int


class LoggedOutBody(msgspec.Struct, frozen=True):
    """The revoked token's id."""

    jti: str


class MemoryStored(msgspec.Struct, frozen=True):
    id: str


class PodStatus(msgspec.Struct, frozen=True):
    """One running pod as it reports itself (``prefix``: its subject prefix; ``details``: what
    its plugins say they run, e.g. ``{"memory": {"embedder": "hashing"}}``)."""

    pod: str
    plugins: list[str]
    ready: bool
    reasons: list[str] = []
    degraded: list[str] = []
    details: dict[str, dict[str, Any]] = {}
    ops_url: str | None = None
    prefix: str = ""


class Health(msgspec.Struct, frozen=True):
    status: str


class ReadyBody(msgspec.Struct, frozen=True, omit_defaults=True):
    ready: bool
    connections: int | None = None


ERRORS: dict[int, str] = {
    400: "The body or a parameter is malformed; `detail` names the field.",
    401: "Missing, malformed, expired or revoked bearer token, or wrong credentials.",
    403: "The job id belongs to another user.",
    404: "No such job, or it belongs to another user.",
    409: "The username is taken.",
    413: "The body is larger than the gateway accepts; nothing was recorded.",
    429: "Too many failed logins for the username or the client address: retry after `Retry-After` seconds.",
    502: "A plugin failed with an error that retrying will not fix.",
    503: "Overloaded, unavailable or out of time (retryable): retry after `Retry-After` seconds.",
}
_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1), description="Seconds to wait before retrying (at least 1)."
)
_HEADERS: dict[str, dict[str, OpenAPIHeader]] = {
    "401": {"WWW-Authenticate": OpenAPIHeader(schema=Schema(type=OpenAPIType.STRING), description="`Bearer`")},
    "429": {"Retry-After": _RETRY_AFTER},
    "503": {"Retry-After": _RETRY_AFTER},
}

#: The Server-Sent Events answer of ``GET /v1/jobs/{id}/events``.
SSE_RESPONSE = ResponseSpec(
    str,
    media_type="text/event-stream",
    generate_examples=False,
    description="Server-Sent Events until the job ends: `id` is the event's sequence (send it back as "
    '`Last-Event-ID` to resume), `event` its type, `data` JSON `{"job_id", "seq", "event", "data", "status"?}` '
    "(`status` on the final `job.done` / `job.failed` / `job.cancelled`).",
)


def error_response(code: int) -> ResponseSpec:
    """The OpenAPI answer of one error status (:data:`ERRORS`)."""
    return ResponseSpec(ErrorBody, description=ERRORS[code], generate_examples=False)


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """The ``responses`` of a route that can answer these error statuses."""
    return {code: error_response(code) for code in codes}


def openapi_config() -> OpenAPIConfig:
    """``/schema`` with the bearer security schemes."""
    return OpenAPIConfig(
        title="AIWFE gateway",
        version="1",
        path="/schema",
        description="HTTP surface of AIWFE. The NATS surface is described by the AsyncAPI document at `/v1/asyncapi.json`.",
        components=Components(
            security_schemes={
                BEARER: SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT",
                    description="The access token from `POST /v1/auth/login`.",
                ),
                QUERY_TOKEN: SecurityScheme(
                    type="apiKey",
                    name="token",
                    security_scheme_in="query",
                    description="The same token as `?token=` (EventSource cannot set headers).",
                ),
            }
        ),
    )


def document_security(app: Litestar, token_dependencies: frozenset[str]) -> None:
    """Finish ``app``'s OpenAPI description (built here, once, instead of on the first ``/schema``).

    A route whose handler takes one of ``token_dependencies`` gets ``security`` (:data:`SECURITY`)
    and a 401 answer; the error answers made by :func:`errors` get their headers
    (``Retry-After`` on 429 and 503, ``WWW-Authenticate`` on 401).
    """
    api = app.plugins.get(OpenAPIPlugin).provide_openapi()
    paths = api.paths or {}
    for route in app.routes:
        item = paths.get(route.path_format or "/")
        for handler in getattr(route, "route_handlers", ()):
            if item is None or not token_dependencies & set(inspect.signature(handler.fn).parameters):
                continue
            for method in getattr(handler, "http_methods", ()):
                op = getattr(item, method.lower(), None)
                if op is not None:
                    op.security = SECURITY
                    op.responses = {**(op.responses or {}), "401": _response(401)}
    for item in paths.values():
        for op in (item.get, item.put, item.post, item.delete, item.patch):
            for code, resp in (op.responses or {}).items() if op is not None else ():
                if isinstance(resp, OpenAPIResponse) and code in _HEADERS and resp.description == ERRORS.get(int(code)):
                    resp.headers = {**(resp.headers or {}), **_HEADERS[code]}


def _response(code: int) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=ERRORS[code],
        content={"application/json": OpenAPIMediaType(schema=Reference(ref="#/components/schemas/ErrorBody"))},
    )
