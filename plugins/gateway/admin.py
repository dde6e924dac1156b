"""Admin routes of the gateway: disable, enable and delete users (``auth.disable_user``,
``auth.delete_user``), list dead letters with their reasons and replay them.

Who is an admin is the auth plugin's decision (``admin_users`` / ``AIWFE_ADMIN_USERS``, an
enabled user; see :mod:`aiwfe.plugins.auth.admin`), checked server-side on every admin call
from the caller's bearer token: the user routes pass the token to the auth plugin, the
dead-letter routes ask it first with ``auth.whoami`` (:func:`whoami`, never cached here, so
a disabled admin loses its rights at once: its token answers 401, and 403 should a pod have
missed the token cut-off). A non-admin gets 403, an unknown user 404 (also a name no user can
have, with a NUL character: the auth plugin's store answers it without asking the database).

Dead letters: ``GET /v1/admin/dead-letters`` (``?kind=`` one job kind's address) lists the
newest :data:`MAX_DEAD_LETTERS` with the reason of their last attempt, their attempts and
a preview of their input; ``POST /v1/admin/dead-letters/{job_id}/replay`` re-queues one
under its own job id (:func:`aiwfe.kernel.admin.replay_dead_letters`, the same as
``aiwfe dlq replay --job-id``); 404 when there is no such dead letter.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
from litestar import Request, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery

from aiwfe.bus.codec import H_ATTEMPTS, H_JOB_ID, H_REASON, is_job_id
from aiwfe.bus.errors import BusError
from aiwfe.kernel import Unavailable
from aiwfe.kernel.admin import replay_dead_letters
from aiwfe.kernel.jobs import Jobs
from aiwfe.kernel.plugin import KernelHandle
from aiwfe.plugins.auth.contract import DeleteUser, DisableUser, Identity, UserUpdated, WhoAmI

from .limits import once
from .openapi import errors
from .services import GatewayServices

__all__ = ["ADMIN_ROUTES", "MAX_DEAD_LETTERS", "DeadLetter", "Replayed", "job_store", "whoami"]

MAX_DEAD_LETTERS = 200
_PREVIEW_CHARS = 500
_ADDRESS = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64}){0,7}")

Services = NamedDependency[GatewayServices]
BearerToken = NamedDependency[str]


class DeadLetter(msgspec.Struct, frozen=True):
    """A dead-lettered job: its kind's address, why its last attempt failed, a preview of its input."""

    job_id: str
    kind: str
    seq: int
    attempts: int
    reason: dict[str, Any]
    input_preview: str


class Replayed(msgspec.Struct, frozen=True):
    replayed: list[str]


def job_store(kernel: KernelHandle) -> Jobs:
    """The pod's job store, which the gateway's kernel handle passes through because the plugin
    is granted the ``"jobs"`` privilege (:attr:`GatewayPlugin.privileges`): dead letters and the
    results bucket, which only the admin and console routes need, are reached here, in one place.
    """
    jobs: Jobs = getattr(kernel, "jobs")  # noqa: B009 - a granted privilege, not in KernelHandle
    return jobs


async def whoami(svc: GatewayServices, bearer: str) -> Identity:
    """The caller's identity as the auth plugin sees it now (``auth.whoami``): user id, name,
    whether it is an admin (an enabled user of the admin list) and disabled.

    Raises:
        AiwfeError: the token is invalid (``InvalidToken`` → 401), or auth did not answer
        (for an admin's token also while auth's database is down → 503).
    """
    return await svc.kernel.call(WhoAmI(token=bearer), timeout_s=svc.config.verify_timeout_s)


async def _require_admin(svc: GatewayServices, bearer: str) -> None:
    if not (await whoami(svc, bearer)).admin:
        raise HTTPException(status_code=403, detail="Forbidden: admin only (see admin_users / AIWFE_ADMIN_USERS)")


def _view(r: UserUpdated) -> dict[str, object]:
    return {"user_id": r.user_id, "username": r.username, "disabled": r.disabled, "deleted": r.deleted}


def _preview(data: bytes) -> str:
    """The job's input as JSON text, cut at ``_PREVIEW_CHARS`` (jobs are stored as JSON or msgpack)."""
    text = None
    for decode in (msgspec.json.decode, msgspec.msgpack.decode):
        try:
            text = msgspec.json.encode(decode(data)).decode()
            break
        except (msgspec.DecodeError, TypeError, ValueError, RecursionError):
            continue
    if text is None:
        text = f"<{len(data)} bytes, neither JSON nor msgpack>"
    return text if len(text) <= _PREVIEW_CHARS else text[: _PREVIEW_CHARS - 1] + "…"


def _reason(raw: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(raw[:4096])
    except msgspec.DecodeError:
        return {"message": raw[:500]}
    return value if isinstance(value, dict) else {"message": str(value)[:500]}


@post("/v1/admin/users/{username:str}/disable", status_code=200, tags=["admin"])
async def disable_user(svc: Services, bearer: BearerToken, username: FromPath[str]) -> dict[str, object]:
    """Disable a user: it cannot log in and its tokens stop working (its sockets close with 4001)."""
    return _view(await svc.kernel.call(DisableUser(token=bearer, username=username)))


@post("/v1/admin/users/{username:str}/enable", status_code=200, tags=["admin"])
async def enable_user(svc: Services, bearer: BearerToken, username: FromPath[str]) -> dict[str, object]:
    """Enable a disabled user again (its tokens from before the disable stay revoked)."""
    return _view(await svc.kernel.call(DisableUser(token=bearer, username=username, disabled=False)))


@delete("/v1/admin/users/{username:str}", status_code=200, tags=["admin"])
async def delete_user(svc: Services, bearer: BearerToken, username: FromPath[str]) -> dict[str, object]:
    """Delete a user and revoke its tokens (the name can then be registered again)."""
    return _view(await svc.kernel.call(DeleteUser(token=bearer, username=username)))


@get("/v1/admin/dead-letters", tags=["admin"], responses=errors(400, 403, 502, 503))
async def list_dead_letters(
    request: Request[Any, Any, Any], svc: Services, bearer: BearerToken, kind: FromQuery[str | None] = None
) -> list[DeadLetter]:
    """The newest dead-lettered jobs with the reason of their last attempt; admins only.

    Only the dead-letter stream's newest 200 messages are read (``?kind=``, a job address such
    as ``helios.ask``, filters among them): a page load never pulls the whole stream, whose
    letters may each be as large as NATS' ``max_payload``. Older ones: ``aiwfe dlq list``.
    Replay (below) looks among the same 200. ``?kind=`` given twice: 400."""
    try:
        kind = once(request.query_params.getall("kind", []), "kind")
    except ValueError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    if kind is not None and not _ADDRESS.fullmatch(kind):
        raise HTTPException(status_code=400, detail=f"kind: not a job address: {kind[:100]!r}")
    await _require_admin(svc, bearer)
    jobs = job_store(svc.kernel)
    dlq = f"{jobs.prefix}.dlq."
    try:
        letters = await jobs.bus.read(f"{dlq}{kind or '>'}", MAX_DEAD_LETTERS)  # bounded: never the whole stream
    except BusError as e:
        raise Unavailable(f"dead letters not read: {e}") from None
    out = []
    for m in letters[-MAX_DEAD_LETTERS:]:
        attempts = m.headers.get(H_ATTEMPTS, "0")
        out.append(
            DeadLetter(
                job_id=m.headers.get(H_JOB_ID, ""),
                kind=m.subject[len(dlq) :],
                seq=m.seq,
                attempts=int(attempts) if attempts.isdigit() else 0,
                reason=_reason(m.headers.get(H_REASON, "")),
                input_preview=_preview(m.data),
            )
        )
    return out[::-1]


@post("/v1/admin/dead-letters/{job_id:str}/replay", status_code=200, tags=["admin"], responses=errors(403, 404, 502, 503))
async def replay_dead_letter(svc: Services, bearer: BearerToken, job_id: FromPath[str]) -> Replayed:
    """Re-queue one dead-lettered job under its own id (it gets a ``job.replayed`` event); admins only."""
    if not is_job_id(job_id):
        raise HTTPException(status_code=404, detail="no dead letter for that job id")
    await _require_admin(svc, bearer)
    done = await replay_dead_letters(job_store(svc.kernel), job_id=job_id, last=MAX_DEAD_LETTERS)
    if not done:
        raise HTTPException(status_code=404, detail=f"no dead letter for job {job_id}")
    return Replayed(replayed=done)


ADMIN_ROUTES = [disable_user, enable_user, delete_user, list_dead_letters, replay_dead_letter]
