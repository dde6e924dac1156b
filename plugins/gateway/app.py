"""The gateway's HTTP surface (Litestar; OpenAPI at ``/schema``) and its ASGI entry point.

Routes: ``POST /v1/auth/register``, ``POST /v1/auth/login``, ``POST /v1/auth/logout``,
``POST /v1/jobs`` (202), ``GET /v1/jobs/{id}``, ``GET /v1/jobs/{id}/events`` (SSE,
``Last-Event-ID`` honoured), ``GET /v1/pods``, ``GET /health``, ``GET /ready``,
``GET /metrics``, ``GET /`` (console). ``/v1/ws`` is the raw ASGI handler of
:mod:`plugins.gateway.ws`, dispatched before Litestar.

Error mapping: ``Overloaded`` and other retryable kernel errors → 503 with
``Retry-After`` at once; ``InvalidToken``/``InvalidCredentials`` → 401; ``UserExists`` →
409; ``InvalidInput`` and unknown job kinds → 400; malformed bodies → 400 (Litestar's
validation message).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.openapi.config import OpenAPIConfig
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage

from aiwfe.kernel import metrics
from aiwfe.kernel.errors import AiwfeError, RemoteError
from aiwfe.plugins.auth.contract import Claims, Login, Logout, Register
from aiwfe.plugins.memory.contract import Recall, Remember

from .ws import TERMINAL, Receive, Scope, Send, WebSocketEndpoint

if TYPE_CHECKING:
    from .plugin import GatewayPlugin

__all__ = [
    "Credentials",
    "JobAccepted",
    "JobSubmission",
    "JobView",
    "build_app",
    "build_asgi",
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
    k: int = 5
    filters: dict[str, str | int | float | bool] = {}


class JobView(msgspec.Struct, frozen=True, omit_defaults=True):
    """A job as ``GET /v1/jobs/{id}`` shows it; ``status`` is pending, done, failed or cancelled."""

    job_id: str
    status: str
    result: Any = None
    error: dict[str, Any] | None = None
    attempts: int = 0
    finished_at: float = 0.0


_STATUS_OF_REMOTE = {"InvalidToken": 401, "InvalidCredentials": 401, "UserExists": 409, "InvalidInput": 400}


def http_error(gw: GatewayPlugin, e: AiwfeError) -> HTTPException:
    """Map a kernel error to the HTTP error a client sees (see the module docstring)."""
    if isinstance(e, RemoteError) and e.type in _STATUS_OF_REMOTE:
        status = _STATUS_OF_REMOTE[e.type]
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return HTTPException(status_code=status, detail=f"{e.type}: {e.message}", headers=headers)
    if e.retryable:
        retry = str(max(1, math.ceil(e.retry_after_s or gw.config.retry_after_s)))
        return HTTPException(status_code=503, detail=f"{e.code}: {e.message}", headers={"Retry-After": retry})
    return HTTPException(status_code=502, detail=f"{e.code}: {e}")


def bearer_token(request: Request[Any, Any, Any]) -> str | None:
    """The bearer token of a request: ``Authorization: Bearer`` or ``?token=`` (for EventSource)."""
    auth = request.headers.get("authorization", "")
    scheme, _, tok = auth.partition(" ")
    if scheme.lower() == "bearer" and tok.strip():
        return tok.strip()
    q = request.query_params.get("token")
    return q or None


def build_app(gw: GatewayPlugin) -> Litestar:
    """Build the Litestar app of gateway ``gw`` (handlers close over it)."""

    async def authenticate(request: Request[Any, Any, Any]) -> Claims:
        token = bearer_token(request)
        if token is None:
            raise HTTPException(status_code=401, detail="missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        try:
            return await gw.verify(token)
        except AiwfeError as e:
            raise http_error(gw, e) from None

    async def require_owner(job_id: str, subject: str) -> None:
        try:
            owned = await gw.owns(job_id, subject)
        except AiwfeError as e:
            raise http_error(gw, e) from None
        if not owned:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")

    @post("/v1/auth/register", status_code=201, tags=["auth"])
    async def register(data: JSONBody[Credentials]) -> dict[str, str]:
        """Create a user."""
        try:
            r = await gw.kernel.call(Register(username=data.username, password=data.password))
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return {"user_id": r.user_id, "username": r.username}

    @post("/v1/auth/login", status_code=200, tags=["auth"])
    async def login(data: JSONBody[Credentials]) -> dict[str, Any]:
        """Log in: ``{access_token, token_type, expires_in}``."""
        try:
            t = await gw.kernel.call(Login(username=data.username, password=data.password))
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return {"access_token": t.access_token, "token_type": t.token_type, "expires_in": t.expires_in}

    @post("/v1/auth/logout", status_code=200, tags=["auth"])
    async def logout(request: Request[Any, Any, Any]) -> dict[str, str]:
        """Revoke the bearer token; its open WebSockets close with 4001."""
        token = bearer_token(request)
        if token is None:
            raise HTTPException(status_code=401, detail="missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        try:
            r = await gw.kernel.call(Logout(token=token))
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return {"jti": r.jti}

    @post("/v1/jobs", status_code=202, tags=["jobs"])
    async def submit_job(request: Request[Any, Any, Any], data: JSONBody[JobSubmission]) -> JobAccepted:
        """Submit a durable job; ``202 {job_id}``. The same ``idempotency_key`` gives the same job."""
        claims = await authenticate(request)
        address = gw.config.job_kinds.get(data.kind)
        if address is None:
            known = ", ".join(sorted(gw.config.job_kinds)) or "none configured"
            raise HTTPException(status_code=400, detail=f"unknown job kind {data.kind!r}; known: {known}")
        try:
            job_id = await gw.submit(address, data.input, claims.sub, data.idempotency_key)
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return JobAccepted(job_id=job_id)

    @get("/v1/jobs/{job_id:str}", tags=["jobs"])
    async def get_job(request: Request[Any, Any, Any], job_id: FromPath[str]) -> JobView:
        """A job's stored outcome, or ``status: pending`` while it has none; 404 for a job
        that does not exist or belongs to someone else."""
        claims = await authenticate(request)
        await require_owner(job_id, claims.sub)
        try:
            rec = await gw.kernel.job_record(job_id)
        except AiwfeError as e:
            raise http_error(gw, e) from None
        if rec is None:
            return JobView(job_id=job_id, status="pending")
        result = msgspec.msgpack.decode(rec.result) if rec.result else None
        return JobView(
            job_id=job_id, status=rec.status, result=result, error=rec.error, attempts=rec.attempts, finished_at=rec.finished_at
        )

    @get("/v1/jobs/{job_id:str}/events", tags=["jobs"])
    async def job_events(
        request: Request[Any, Any, Any], job_id: FromPath[str], after_seq: FromQuery[int] = 0
    ) -> ServerSentEvent:
        """Server-Sent Events of a job (replay, then live) until it ends.

        Each event's ``id`` is its sequence; a reconnecting EventSource sends
        ``Last-Event-ID`` and continues after it (``?after_seq=`` does the same).
        """
        claims = await authenticate(request)
        await require_owner(job_id, claims.sub)
        last = request.headers.get("last-event-id")
        if last:
            try:
                after_seq = max(after_seq, int(last))
            except ValueError:
                raise HTTPException(status_code=400, detail="Last-Event-ID must be an integer sequence") from None

        async def stream() -> AsyncIterator[ServerSentEventMessage]:
            async for ev in gw.kernel.job_events(job_id, after_seq):
                payload = {"job_id": job_id, "seq": ev.seq, "event": ev.type, "data": ev.data}
                if ev.type in TERMINAL:
                    payload["status"] = TERMINAL[ev.type]
                yield ServerSentEventMessage(data=msgspec.json.encode(payload).decode(), event=ev.type, id=str(ev.seq))

        return ServerSentEvent(stream())

    @post("/v1/memory", status_code=201, tags=["memory"])
    async def remember(request: Request[Any, Any, Any], data: JSONBody[MemoryIn]) -> dict[str, str]:
        """Store a memory for the calling user (the owner is always the token's subject)."""
        claims = await authenticate(request)
        try:
            r = await gw.kernel.call(Remember(text=data.text, owner=claims.sub, metadata=data.metadata))
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return {"id": r.id}

    @post("/v1/memory/recall", status_code=200, tags=["memory"])
    async def recall(request: Request[Any, Any, Any], data: JSONBody[RecallIn]) -> dict[str, Any]:
        """The calling user's memories closest to ``query`` (never another user's)."""
        claims = await authenticate(request)
        try:
            r = await gw.kernel.call(Recall(query=data.query, owner=claims.sub, k=data.k, filters=data.filters))
        except AiwfeError as e:
            raise http_error(gw, e) from None
        return msgspec.to_builtins(r)

    @get("/v1/pods", tags=["ops"])
    async def pods() -> list[dict[str, Any]]:
        """Every running pod of the system with its plugins and readiness."""
        return await gw.kernel.cluster_status()

    @get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        """The gateway process is alive."""
        return {"status": "ok"}

    @get("/ready", tags=["ops"])
    async def ready() -> Response[dict[str, Any]]:
        """200 while the gateway serves, 503 while starting or stopping."""
        if gw.serving:
            return Response({"ready": True, "connections": gw.hub.count()})
        return Response({"ready": False}, status_code=503)

    @get("/metrics", tags=["ops"], media_type="text/plain; version=0.0.4")
    async def prometheus() -> bytes:
        """Prometheus text exposition of the pod's metrics."""
        return metrics.render()

    @get("/", include_in_schema=False, media_type="text/html")
    async def console() -> bytes:
        """The console page."""
        return (STATIC / "index.html").read_bytes()

    return Litestar(
        route_handlers=[
            register,
            login,
            logout,
            submit_job,
            get_job,
            job_events,
            remember,
            recall,
            pods,
            health,
            ready,
            prometheus,
            console,
        ],
        openapi_config=OpenAPIConfig(title="AIWFE gateway", version="1", path="/schema"),
        debug=False,
    )


def build_asgi(gw: GatewayPlugin) -> Any:
    """The gateway's ASGI app: ``/v1/ws`` goes to the WebSocket endpoint, the rest to Litestar."""
    app = build_app(gw)
    ws = WebSocketEndpoint(gw)

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            if scope["path"] == "/v1/ws":
                await ws(scope, receive, send)
                return
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        await app(scope, receive, send)  # type: ignore[arg-type]

    return asgi
