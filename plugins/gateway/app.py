"""The gateway's HTTP surface (Litestar; OpenAPI at ``/schema``) and its ASGI entry point.

Routes: ``POST /v1/auth/register``, ``POST /v1/auth/login``, ``POST /v1/auth/logout``,
``POST /v1/jobs`` (202), ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (SSE,
``Last-Event-ID`` honoured), ``POST /v1/memory``, ``POST /v1/memory/recall``,
``GET /v1/pods``, ``GET /v1/asyncapi.json`` (:mod:`~aiwfe.plugins.gateway.busdoc`),
``GET /health``, ``GET /ready``, ``GET /metrics``, ``GET /`` (console), and the admin routes
of :mod:`~aiwfe.plugins.gateway.admin`. What OpenAPI says beyond the types (security schemes,
error statuses and their headers, SSE) is in :mod:`~aiwfe.plugins.gateway.openapi`.
``/v1/ws`` is the raw ASGI handler of :mod:`aiwfe.plugins.gateway.ws`, dispatched before
Litestar.

Handlers get what they need as Litestar dependencies: ``svc`` (the
:class:`~aiwfe.plugins.gateway.services.GatewayServices`), ``bearer`` (the request's bearer
token; 401 without one), ``claims`` (that token verified with ``auth.verify``) and
``owned_job`` (the path's ``job_id`` when the caller owns it; 404 otherwise, also for a job
that does not exist).

Error mapping, in one exception handler for every :class:`~aiwfe.kernel.AiwfeError` a
handler or dependency raises: ``InvalidToken``/``InvalidCredentials`` → 401 (with
``WWW-Authenticate: Bearer``); ``UserExists`` → 409; ``InvalidInput`` and ``BadInput`` (job
input that does not fit its contract, the field named) → 400; ``TooLarge`` → 413;
``TooManyAttempts`` (login throttling) and ``TooManyJobs`` (the user's job slots of that
kind are all taken, :mod:`aiwfe.kernel.quotas`) → 429 with ``Retry-After``; ``Forbidden`` → 403;
``UnknownUser`` → 404; other
retryable errors (``Overloaded``, ``Unavailable``, ...) → 503 with ``Retry-After`` at once;
the rest → 502 (a remote error's type, not its message: that is the plugin's internal detail,
a database's error text for one). Unknown job kinds → 400; malformed bodies → 400 (Litestar's
validation message); body values the bus or a plugin's database cannot hold (integers past
64 bits, NUL characters in text: :func:`~aiwfe.plugins.gateway.limits.check_values`), an
empty memory text → 400 naming the field; bodies over ``max_body_bytes`` → 413 before any
handler runs. Bodies are Litestar's ``{"status_code", "detail"}``. HEAD is answered as GET
without the body, OPTIONS with every method of the path
(:func:`~aiwfe.plugins.gateway.limits.methods`).

The app leaves logging alone (``logging_config=None``): the pod configures it once.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.exceptions import HTTPException
from litestar.exceptions.responses import create_exception_response
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, JSONBody, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from aiwfe.bus.codec import is_job_id
from aiwfe.kernel import AiwfeError, Forbidden, RemoteError, acting_for, metrics
from aiwfe.kernel.errors import BadInput, TooLarge
from aiwfe.kernel.quotas import TooManyJobs
from aiwfe.plugins.auth.contract import Claims, LoggedOut, Login, Logout, Register, Registered, Token
from aiwfe.plugins.memory.contract import Recall, RecallResult, Remember, RememberResult

from .admin import ADMIN_ROUTES
from .busdoc import BusDocument, asyncapi_route
from .console_api import CONSOLE_ROUTES
from .frames import TERMINAL
from .hub import Held
from .limits import MAX_SEQ, check_values, finished_last_seq, guard, methods, once, parse_seq, past_end, running_past_end
from .openapi import (
    SSE_RESPONSE,
    Health,
    LoggedOutBody,
    MemoryStored,
    PodStatus,
    ReadyBody,
    TokenBody,
    UserBody,
    document_security,
    errors,
    openapi_config,
)
from .services import GatewayServices
from .ws import Receive, Scope, Send, WebSocketEndpoint

__all__ = [
    "Credentials",
    "JobAccepted",
    "JobSubmission",
    "JobView",
    "MemoryIn",
    "RecallIn",
    "bearer_token",
    "build_app",
    "build_asgi",
    "http_error",
]

STATIC = Path(__file__).resolve().parent / "static"


class Credentials(msgspec.Struct, frozen=True):
    """Body of register and login."""

    username: str
    password: str


class JobSubmission(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/jobs``: ``kind`` is a key of the gateway's ``job_kinds``."""

    kind: str
    input: dict[str, Any] = {}
    idempotency_key: str | None = None


class JobAccepted(msgspec.Struct, frozen=True):
    job_id: str


class MemoryIn(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/memory``: a memory of the calling user."""

    text: str
    metadata: dict[str, Any] = {}


class RecallIn(msgspec.Struct, frozen=True):
    """Body of ``POST /v1/memory/recall``: the calling user's memories closest to ``query``."""

    query: str
    k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    filters: dict[str, str | int | float | bool] = {}


class JobView(msgspec.Struct, frozen=True, omit_defaults=True):
    """A job as ``GET /v1/jobs/{id}`` shows it; ``status`` is pending, done, failed or cancelled."""

    job_id: str
    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    finished_at: float = 0.0


#: The dependencies that need a bearer token: a route using one is documented as protected.
TOKEN_DEPENDENCIES = frozenset({"bearer", "claims", "owned_job"})

# The dependencies of ``build_app``, as handlers declare them (by parameter name).
Services = NamedDependency[GatewayServices]
CallerClaims = NamedDependency[Claims]
BearerToken = NamedDependency[str]
OwnedJob = NamedDependency[str]

_STATUS_OF_REMOTE = {
    "InvalidToken": 401,
    "InvalidCredentials": 401,
    "UserExists": 409,
    "InvalidInput": 400,
    "TooManyAttempts": 429,
    "UnknownUser": 404,
}
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def http_error(e: AiwfeError, retry_after_s: float) -> HTTPException:
    """Map a kernel error to the HTTP error a client sees (see the module docstring).

    ``retry_after_s`` is the hint for retryable errors (rounded up to whole seconds, at least 1).
    """
    if isinstance(e, (BadInput, TooLarge)):  # refused at the edge, nothing recorded
        return HTTPException(status_code=413 if isinstance(e, TooLarge) else 400, detail=f"{e.code}: {e.message}")
    if isinstance(e, RemoteError) and e.type in _STATUS_OF_REMOTE:
        status = _STATUS_OF_REMOTE[e.type]
        headers = _CHALLENGE if status == 401 else None
        if status == 429:  # login throttling: the hint is when the lock ends
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after_s or retry_after_s)))}
        return HTTPException(status_code=status, detail=f"{e.type}: {e.message}", headers=headers)
    if isinstance(e, TooManyJobs):  # fair share: this user's slots are full, others' are not
        retry = str(max(1, math.ceil(e.retry_after_s or retry_after_s)))
        return HTTPException(status_code=429, detail=f"{e.code}: {e.message}", headers={"Retry-After": retry})
    if isinstance(e, Forbidden):
        return HTTPException(status_code=403, detail=f"{e.code}: {e.message}")
    if e.retryable:
        retry = str(max(1, math.ceil(retry_after_s)))
        return HTTPException(status_code=503, detail=f"{e.code}: {e.message}", headers={"Retry-After": retry})
    if isinstance(e, RemoteError):  # its message is the plugin's internal detail (a database's error text...)
        return HTTPException(status_code=502, detail=f"{e.code}: {e.type}")
    return HTTPException(status_code=502, detail=f"{e.code}: {e}")


def bearer_token(request: Request[Any, Any, Any]) -> str | None:
    """The bearer token of a request: ``Authorization: Bearer`` or ``?token=`` (for EventSource)."""
    auth = request.headers.get("authorization", "")
    scheme, _, tok = auth.partition(" ")
    if scheme.lower() == "bearer" and tok.strip():
        return tok.strip()
    q = request.query_params.get("token")
    return q or None


# -- dependencies ----------------------------------------------------------------------


async def _bearer(request: Request[Any, Any, Any]) -> str:
    token = bearer_token(request)
    if token is None:
        raise HTTPException(status_code=401, detail="missing bearer token", headers=_CHALLENGE)
    return token


async def _claims(svc: Services, bearer: BearerToken) -> Claims:
    return await svc.verify(bearer)


async def _owned_job(svc: Services, claims: CallerClaims, job_id: FromPath[str]) -> str:
    if not is_job_id(job_id) or not await svc.owns(job_id, claims.sub):
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return job_id


def _check(value: Any, field: str, *, text: bool = False) -> None:
    """400 naming the field for a body value the bus or a database cannot hold (:func:`check_values`)."""
    try:
        check_values(value, field, text=text)
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None


# -- routes ----------------------------------------------------------------------------


@post("/v1/auth/register", status_code=201, tags=["auth"], responses=errors(400, 409, 413, 502, 503))
async def register(svc: Services, data: JSONBody[Credentials]) -> UserBody:
    """Create a user."""
    r: Registered = await svc.kernel.call(Register(username=data.username, password=data.password))
    return UserBody(user_id=r.user_id, username=r.username)


@post("/v1/auth/login", status_code=200, tags=["auth"], responses=errors(400, 401, 413, 429, 502, 503))
async def login(request: Request[Any, Any, Any], svc: Services, data: JSONBody[Credentials]) -> TokenBody:
    """Log in: ``{access_token, token_type, expires_in}``; 429 with ``Retry-After`` after too
    many failures for the username or the client address."""
    client = request.client.host if request.client else ""
    t: Token = await svc.kernel.call(Login(username=data.username, password=data.password, client=client))
    return TokenBody(access_token=t.access_token, token_type=t.token_type, expires_in=t.expires_in)


@post("/v1/auth/logout", status_code=200, tags=["auth"], responses=errors(502, 503))
async def logout(svc: Services, bearer: BearerToken) -> LoggedOutBody:
    """Revoke the bearer token; its open WebSockets close with 4001."""
    r: LoggedOut = await svc.kernel.call(Logout(token=bearer))
    return LoggedOutBody(jti=r.jti)


@post("/v1/jobs", status_code=202, tags=["jobs"], responses=errors(400, 403, 413, 429, 502, 503))
async def submit_job(svc: Services, claims: CallerClaims, data: JSONBody[JobSubmission]) -> JobAccepted:
    """Submit a durable job; ``202 {job_id}``. The same ``idempotency_key`` gives the same job.
    400 for a budget over the server's cap (the field, value and cap named); 429 with
    ``Retry-After`` when the caller already has as many unfinished jobs of the kind as allowed."""
    job_kinds = svc.config.job_kinds
    address = job_kinds.get(data.kind)
    if address is None:
        known = ", ".join(sorted(job_kinds)) or "none configured"
        raise HTTPException(status_code=400, detail=f"unknown job kind {data.kind!r}; known: {known}")
    return JobAccepted(job_id=await svc.submit(address, data.input, claims.sub, data.idempotency_key))


@get("/v1/jobs/{job_id:str}", tags=["jobs"], responses=errors(404, 502, 503))
async def get_job(svc: Services, owned_job: OwnedJob) -> JobView:
    """A job's stored outcome, or ``status: pending`` while it has none; 404 for a job
    that does not exist or belongs to someone else."""
    rec = await svc.kernel.job_record(owned_job)
    if rec is None:
        return JobView(job_id=owned_job, status="pending")
    return JobView(
        job_id=owned_job,
        status=rec.status,
        result=rec.decoded(),
        error=rec.error,
        attempts=rec.attempts,
        finished_at=rec.finished_at,
    )


@get(
    "/v1/jobs/{job_id:str}/events",
    tags=["jobs"],
    responses={
        200: SSE_RESPONSE,
        204: ResponseSpec(None, description="The client has seen the job's last event: nothing more to stream."),
        **errors(400, 404, 429, 502, 503),
    },
)
async def job_events(
    request: Request[Any, Any, Any],
    svc: Services,
    claims: CallerClaims,
    owned_job: OwnedJob,
    after_seq: Annotated[
        str | None, Parameter(description="Resume after this sequence", schema_extra={"type": "integer", "maximum": MAX_SEQ})
    ] = None,
) -> ServerSentEvent:
    """Server-Sent Events of a job (replay, then live) until it ends.

    Each event's ``id`` is its sequence; a reconnecting EventSource sends ``Last-Event-ID`` and continues after it
    (``?after_seq=`` does the same). Sequences are range-checked (400; also when either is given twice); past a
    job's last event (finished or not): 400; at a finished job's last event: 204 (no more events). A stream is one of
    the user's ``max_sockets_per_user`` long-lived connections, as a WebSocket is (past them, 429), and ends as one
    closes: token revoked or expired, user disabled or deleted (:class:`~.hub.Held`).
    """
    try:
        query = once(request.query_params.getall("after_seq", []), "after_seq")
        last = once(request.headers.getall("last-event-id", []), "Last-Event-ID")
        seq = parse_seq(query, "after_seq") if query is not None else 0
        if last:
            seq = max(seq, parse_seq(last, "Last-Event-ID"))
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    end = await finished_last_seq(svc.kernel, owned_job, seq)
    if end is None and (now := await running_past_end(svc.kernel, owned_job, seq)) is not None:
        raise HTTPException(status_code=400, detail=past_end(seq, now))
    if end is not None and seq > end:
        raise HTTPException(status_code=400, detail=past_end(seq, end))
    if end is not None and seq == end:  # the client saw the end; 204 stops EventSource reconnecting
        return Response(content=b"", status_code=204)  # type: ignore[return-value]

    async def stream() -> AsyncIterator[ServerSentEventMessage]:
        async for ev in svc.kernel.job_events(owned_job, seq):
            payload = {"job_id": owned_job, "seq": ev.seq, "event": ev.type, "data": ev.data}
            if ev.type in TERMINAL:
                payload["status"] = TERMINAL[ev.type]
            yield ServerSentEventMessage(data=msgspec.json.encode(payload).decode(), event=ev.type, id=str(ev.seq))

    limit = svc.config.max_sockets_per_user  # an event stream counts as one of the user's long-lived connections
    if not svc.hub.hold(claims.sub, limit):
        retry = {"Retry-After": str(max(1, math.ceil(svc.config.retry_after_s)))}
        raise HTTPException(status_code=429, detail=f"at most {limit} WebSockets and event streams per user", headers=retry)
    return ServerSentEvent(Held(svc.hub, claims.sub, stream(), claims.jti, float(claims.exp)))


@post("/v1/memory", status_code=201, tags=["memory"], responses=errors(400, 413, 502, 503))
async def remember(svc: Services, claims: CallerClaims, data: JSONBody[MemoryIn]) -> MemoryStored:
    """Store a memory for the calling user (the owner is always the token's subject)."""
    if not data.text.strip():
        raise HTTPException(status_code=400, detail="text: must not be empty")
    _check(data.text, "text", text=True)
    _check(data.metadata, "metadata", text=True)
    with acting_for(claims.sub):
        r: RememberResult = await svc.kernel.call(Remember(text=data.text, owner=claims.sub, metadata=data.metadata))
    return MemoryStored(id=r.id)


@post("/v1/memory/recall", status_code=200, tags=["memory"], responses=errors(400, 413, 502, 503))
async def recall(svc: Services, claims: CallerClaims, data: JSONBody[RecallIn]) -> RecallResult:
    """The calling user's memories closest to ``query`` (never another user's)."""
    _check(data.query, "query", text=True)
    _check(data.filters, "filters", text=True)
    with acting_for(claims.sub):
        r: RecallResult = await svc.kernel.call(Recall(query=data.query, owner=claims.sub, k=data.k, filters=data.filters))
    return r


@get("/v1/pods", tags=["ops"], responses={200: ResponseSpec(list[PodStatus], description="The pods that answered")})
async def pods(svc: Services) -> list[dict[str, Any]]:
    """Every running pod of the system with its plugins and readiness."""
    return await svc.kernel.cluster_status()


@get("/health", tags=["ops"])
async def health() -> Health:
    """The gateway process is alive."""
    return Health(status="ok")


@get(
    "/ready", tags=["ops"], responses={503: ResponseSpec(ReadyBody, description="Starting or stopping", generate_examples=False)}
)
async def ready(svc: Services) -> Response[ReadyBody]:
    """200 while the gateway serves, 503 while starting or stopping."""
    if svc.serving:
        return Response(ReadyBody(ready=True, connections=svc.hub.count()))
    return Response(ReadyBody(ready=False), status_code=503)


@get("/metrics", tags=["ops"], media_type="text/plain; version=0.0.4")
async def prometheus() -> bytes:
    """Prometheus text exposition of the pod's metrics."""
    return metrics.render()


@get("/", include_in_schema=False, media_type="text/html")
async def console() -> bytes:
    """The console page."""
    return (STATIC / "index.html").read_bytes()


ROUTES = [register, login, logout, submit_job, get_job, job_events, remember, recall, pods, health, ready, prometheus, console]
ROUTES += ADMIN_ROUTES  # plugins/gateway/admin.py
ROUTES += CONSOLE_ROUTES  # plugins/gateway/console_api.py


def build_app(services: GatewayServices) -> Litestar:
    """Build the Litestar app serving ``services`` (the handlers get it as the ``svc`` dependency),
    with ``GET /v1/asyncapi.json`` for the pods that answer through ``services.kernel``.

    The app does not configure logging (``logging_config=None``).
    """

    def too_deep_body(request: Request[Any, Any, Any], e: RecursionError) -> Response[Any]:
        return create_exception_response(request, HTTPException(status_code=400, detail="JSON body nested too deeply"))

    def on_error(request: Request[Any, Any, Any], e: AiwfeError) -> Response[Any]:
        return create_exception_response(request, http_error(e, services.retry_after_s(e)))

    app = Litestar(
        route_handlers=[*ROUTES, asyncapi_route(BusDocument(services.kernel))],
        dependencies={
            "svc": Provide(lambda: services, use_cache=True, sync_to_thread=False),
            "bearer": Provide(_bearer),
            "claims": Provide(_claims),
            "owned_job": Provide(_owned_job),
        },
        exception_handlers={AiwfeError: on_error, RecursionError: too_deep_body},
        openapi_config=openapi_config(),
        request_max_body_size=services.config.max_body_bytes,
        logging_config=None,
        debug=False,
    )
    document_security(app, TOKEN_DEPENDENCIES)
    return app


def build_asgi(services: GatewayServices) -> Any:
    """The gateway's ASGI app: ``/v1/ws`` goes to the WebSocket endpoint, the rest to Litestar;
    both behind :func:`~aiwfe.plugins.gateway.limits.guard` (header size, JSON content type, body
    size); HEAD and OPTIONS through :func:`~aiwfe.plugins.gateway.limits.methods`."""
    app = build_app(services)
    ws = WebSocketEndpoint(services)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == "/v1/ws":
                await ws(scope, receive, send)
                return
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        await app(scope, receive, send)  # type: ignore[arg-type]

    return guard(methods(asgi), services.config.max_header_bytes, services.config.max_body_bytes)
