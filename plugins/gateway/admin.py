"""Admin routes of the gateway: disable, enable and delete users (``auth.disable_user``,
``auth.delete_user``). The caller's bearer token must be an admin's (the auth plugin decides:
``admin_users`` / ``AIWFE_ADMIN_USERS``); otherwise 403. An unknown user is 404."""

from __future__ import annotations

from litestar import delete, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from aiwfe.plugins.auth.contract import DeleteUser, DisableUser, UserUpdated

from .services import GatewayServices

__all__ = ["ADMIN_ROUTES"]

Services = NamedDependency[GatewayServices]
BearerToken = NamedDependency[str]


def _view(r: UserUpdated) -> dict[str, object]:
    return {"user_id": r.user_id, "username": r.username, "disabled": r.disabled, "deleted": r.deleted}


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


ADMIN_ROUTES = [disable_user, enable_user, delete_user]
