"""What the console page (``GET /``) needs beyond the public API: its files, the job kinds,
the caller, the caller's job history and a few live figures of this gateway's pod.

Routes:

* ``GET /console/{name}``: the page's script and stylesheet (a fixed list of files of
  ``static/``, nothing else is served; no build step, nothing loaded from elsewhere).
* ``GET /v1/console/kinds``: the job kinds this gateway accepts with their contract
  addresses; the page finds each kind's JSON Schema in ``GET /v1/asyncapi.json`` (message
  ``submit-<address>``) and generates an example input from it.
* ``GET /v1/console/me``: the caller's name and whether it is an admin (asked of the auth
  plugin with ``auth.whoami``, :func:`~aiwfe.plugins.gateway.admin.whoami`; the admin routes
  ask again on every call, so the page's answer only decides what it shows).
* ``GET /v1/console/jobs``: the caller's recent jobs, newest first, each with its status
  (``pending`` until the job has an outcome record).
* ``POST /v1/console/jobs``: ``{job_id, kind}`` adds one of the caller's own jobs to that
  list (the page does it for every job it submits or opens); 404 for a job that is not
  the caller's.
* ``GET /v1/console/jobs/{job_id}``: one of the caller's jobs by id (the page's "open by
  id"), with its status and kind: the kind the history lists, else the outcome record's
  (empty for a job neither knows yet: one submitted elsewhere and still running, or
  cancelled); 404 for a job that is not the caller's, as for every job route.
* ``GET /v1/console/figures``: this gateway pod's open WebSockets, job deliveries by
  outcome, dead letters, queue depths and memory (from its Prometheus registry).

**Job history: where and how big.** One key per user in the JetStream results bucket,
``hist.<h>``, ``h`` the first 32 hex digits of SHA-256 of the user id (a key the bucket always
accepts, and that does not spell the id out): a msgpack list of at most
:data:`HISTORY_MAX` ``[job_id, kind, submitted_at]``, newest first. Jobs are listed as the
console records them (each one it submits or opens), not by the submit path itself. It lives as long as the
bucket keeps values (the results TTL), like the job records it points to, and is shared by
every gateway replica. The bucket writes create-once, so an update is read, delete, create;
writes of one user are serialised inside this process (striped locks), and a create that
loses a race with another replica is retried (:data:`HISTORY_RETRIES`), so across replicas
an entry can be lost only when two of them record the same user's jobs in the same instant.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import weakref
from pathlib import Path
from typing import Annotated

import msgspec
from litestar import Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath, JSONBody

from aiwfe.bus.codec import is_job_id
from aiwfe.kernel import metrics
from aiwfe.kernel.jobs import JobRecord
from aiwfe.kernel.plugin import KernelHandle
from aiwfe.plugins.auth.contract import Claims

from .admin import job_store, whoami
from .openapi import errors
from .services import GatewayServices

__all__ = ["CONSOLE_ROUTES", "HISTORY_MAX", "HISTORY_RETRIES", "HistoryEntry", "JobHistory"]

HISTORY_MAX = 50
HISTORY_RETRIES = 5
_STATIC = Path(__file__).resolve().parent / "static"
_JS, _CSS = "text/javascript; charset=utf-8", "text/css; charset=utf-8"
_FILES = {"console.js": _JS, "dom.js": _JS, "jobview.js": _JS, "console.css": _CSS}

Services = NamedDependency[GatewayServices]
CallerClaims = NamedDependency[Claims]
BearerToken = NamedDependency[str]

_JobId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,128}$")]
_Kind = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
_entries = msgspec.msgpack.Decoder(list[tuple[str, str, float]])


class KindInfo(msgspec.Struct, frozen=True):
    kind: str
    address: str


class Kinds(msgspec.Struct, frozen=True):
    """The job kinds of ``POST /v1/jobs`` and WebSocket ``submit``; schemas: ``/v1/asyncapi.json``."""

    kinds: list[KindInfo]
    asyncapi: str = "/v1/asyncapi.json"


class Me(msgspec.Struct, frozen=True):
    username: str
    admin: bool


class HistoryIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/console/jobs``: one of the caller's jobs and its kind."""

    job_id: _JobId
    kind: _Kind


class HistoryEntry(msgspec.Struct, frozen=True):
    """One of the caller's jobs: ``status`` is pending, done, failed or cancelled."""

    job_id: str
    kind: str
    submitted_at: float
    status: str
    finished_at: float = 0.0
    error: str = ""


class Figures(msgspec.Struct, frozen=True):
    """Live figures of this gateway's pod (its own Prometheus registry)."""

    ws_connections: int
    jobs: dict[str, float]
    dead_letters: float
    queue_depth: dict[str, float]
    resident_memory_mb: float


_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[asyncio.Lock]] = weakref.WeakKeyDictionary()


def _lock(key: str) -> asyncio.Lock:
    """One of 64 striped locks of the running loop (a lock belongs to one loop)."""
    locks = _locks.setdefault(asyncio.get_running_loop(), [])
    if not locks:
        locks.extend(asyncio.Lock() for _ in range(64))
    return locks[hash(key) % len(locks)]


class JobHistory:
    """The bounded per-user job lists in the results bucket (see the module docstring)."""

    def __init__(self, kernel: KernelHandle) -> None:
        self.kernel = kernel

    @staticmethod
    def key(sub: str) -> str:
        return "hist." + hashlib.sha256(sub.encode()).hexdigest()[:32]

    async def entries(self, sub: str) -> list[tuple[str, str, float]]:
        """The user's ``(job_id, kind, submitted_at)``, newest first (a corrupt value reads as none)."""
        raw = await job_store(self.kernel).bus.kv_get(self.key(sub))
        if not raw:
            return []
        try:
            return _entries.decode(raw)[:HISTORY_MAX]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return []

    async def add(self, sub: str, job_id: str, kind: str) -> None:
        """Put ``job_id`` first in the user's list, dropping the oldest past :data:`HISTORY_MAX`;
        a job already listed keeps its place (the list stays in the order jobs were first seen)."""
        bus = job_store(self.kernel).bus
        key = self.key(sub)
        async with _lock(key):
            for _ in range(HISTORY_RETRIES):
                old = await self.entries(sub)
                if any(e[0] == job_id for e in old):
                    return
                new = [(job_id, kind, time.time()), *old][:HISTORY_MAX]
                if old:
                    await bus.kv_delete(key)
                if await bus.kv_create(key, msgspec.msgpack.encode(new)):
                    return


# -- routes ----------------------------------------------------------------------------


@get("/console/{name:str}", include_in_schema=False)
async def console_file(name: FromPath[str]) -> Response[bytes]:
    """A file of the console page (only those of ``_FILES``)."""
    media = _FILES.get(name)
    if media is None:
        raise HTTPException(status_code=404, detail=f"no console file {name!r}")
    return Response((_STATIC / name).read_bytes(), media_type=media, headers={"Cache-Control": "no-cache"})


@get("/v1/console/kinds", tags=["console"])
async def console_kinds(svc: Services) -> Kinds:
    """The job kinds this gateway accepts and their contract addresses."""
    return Kinds(kinds=[KindInfo(kind=k, address=a) for k, a in sorted(svc.config.job_kinds.items())])


@get("/v1/console/me", tags=["console"], responses=errors(502, 503))
async def console_me(svc: Services, bearer: BearerToken) -> Me:
    """The caller's name and whether the auth plugin counts it as an admin."""
    who = await whoami(svc, bearer)
    return Me(username=who.username, admin=who.admin)


def _entry(job_id: str, kind: str, at: float, rec: JobRecord | None) -> HistoryEntry:
    if rec is None:
        return HistoryEntry(job_id=job_id, kind=kind, submitted_at=at, status="pending")
    err = rec.error or {}
    text = f"{err.get('type', '')}: {err.get('message', '')}"[:300] if err else ""
    return HistoryEntry(job_id=job_id, kind=kind, submitted_at=at, status=rec.status, finished_at=rec.finished_at, error=text)


@get("/v1/console/jobs", tags=["console"], responses=errors(502, 503))
async def console_jobs(svc: Services, claims: CallerClaims) -> list[HistoryEntry]:
    """The caller's recent jobs (at most 50), newest first, each with its status."""
    entries = await JobHistory(svc.kernel).entries(claims.sub)
    records = await asyncio.gather(*(svc.kernel.job_record(e[0]) for e in entries))
    return [_entry(*e, rec) for e, rec in zip(entries, records, strict=True)]


@get("/v1/console/jobs/{job_id:str}", tags=["console"], responses=errors(404, 502, 503))
async def console_job(svc: Services, claims: CallerClaims, job_id: FromPath[str]) -> HistoryEntry:
    """One of the caller's jobs by id, with its status and kind (empty while unknown; see the
    module docstring); 404 when the job is not the caller's."""
    if not is_job_id(job_id) or not await svc.owns(job_id, claims.sub):
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    entries, rec = await asyncio.gather(JobHistory(svc.kernel).entries(claims.sub), svc.kernel.job_record(job_id))
    listed = next((e for e in entries if e[0] == job_id), None)
    if listed is not None:
        return _entry(*listed, rec)
    by_address = {a: k for k, a in svc.config.job_kinds.items()}
    return _entry(job_id, by_address.get(rec.kind, "") if rec is not None else "", 0.0, rec)


@post("/v1/console/jobs", status_code=201, tags=["console"], responses=errors(400, 404, 502, 503))
async def console_add_job(svc: Services, claims: CallerClaims, data: JSONBody[HistoryIn]) -> HistoryIn:
    """Add one of the caller's own jobs to its history (404 when the job is not the caller's)."""
    if data.kind not in svc.config.job_kinds:
        raise HTTPException(status_code=400, detail=f"unknown job kind {data.kind!r}")
    if not is_job_id(data.job_id) or not await svc.owns(data.job_id, claims.sub):
        raise HTTPException(status_code=404, detail=f"no job {data.job_id}")
    await JobHistory(svc.kernel).add(claims.sub, data.job_id, data.kind)
    return data


@get("/v1/console/figures", tags=["console"])
async def console_figures(svc: Services) -> Figures:
    """A few live figures of this gateway's pod."""
    jobs: dict[str, float] = {}
    depth: dict[str, float] = {}
    dead = rss = 0.0
    for fam in metrics.REGISTRY.collect():
        for s in fam.samples:
            if s.name == "aiwfe_jobs_total":
                jobs[s.labels.get("outcome", "")] = jobs.get(s.labels.get("outcome", ""), 0.0) + s.value
            elif s.name == "aiwfe_dead_letters_total":
                dead += s.value
            elif s.name == "aiwfe_job_queue_depth":
                depth[s.labels.get("kind", "")] = s.value
            elif s.name == "process_resident_memory_bytes":
                rss = s.value
    return Figures(
        ws_connections=svc.hub.count(),
        jobs=jobs,
        dead_letters=dead,
        queue_depth=depth,
        resident_memory_mb=round(rss / 1_048_576, 1),
    )


CONSOLE_ROUTES = [console_file, console_kinds, console_me, console_jobs, console_job, console_add_job, console_figures]
