"""``auth.whoami``: who a token's user is now and whether it is an admin, decided by the auth
plugin at each call (real PostgreSQL and Redis; LocalBus and NATS)."""

from __future__ import annotations

from typing import Any

import pytest

from aiwfe.kernel.errors import Forbidden, Unavailable
from aiwfe.plugins.auth.contract import DisableUser, Identity, Login, Register, Verify, WhoAmI
from tests.support.auth import PASSWORD, StartAuth, auth_config, expect_invalid, plugin_of

pytestmark = pytest.mark.integration


async def test_whoami_answers_admin_only_for_an_enabled_listed_user(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str
) -> None:
    async with start_auth(auth_config(pg_url, redis_url, prefix, admin_users=["Root", "Second", "Eve"])) as pods:
        k = pods["client"].kernel
        tokens = {}
        for name in ("root", "second", "alice", "eve"):
            await k.call(Register(username=name, password=PASSWORD))
            tokens[name] = (await k.call(Login(username=name, password=PASSWORD))).access_token
        root, second, alice = tokens["root"], tokens["second"], tokens["alice"]
        alice_sub = (await k.call(Verify(token=alice))).sub

        who = await k.call(WhoAmI(token=root))
        assert isinstance(who, Identity) and (who.username, who.admin, who.disabled) == ("root", True, False)
        assert await k.call(WhoAmI(token=alice)) == Identity(user_id=alice_sub, username="alice")
        await expect_invalid(k.call(WhoAmI(token="not-a-token")), "InvalidToken", "")

        # An admin disabled by another: its token is cut off at once (InvalidToken, the gateway's 401).
        await k.call(DisableUser(token=root, username="second"))
        await expect_invalid(k.call(WhoAmI(token=second)), "InvalidToken", "revoked")
        await expect_invalid(k.call(DisableUser(token=second, username="alice")), "InvalidToken", "revoked")

        # A pod that missed the cut-off (only the row says disabled): no admin rights either.
        auth = plugin_of(pods["auth"])
        assert auth.store is not None
        await auth.store.set_disabled("root", True)
        try:
            who = await k.call(WhoAmI(token=root))
            assert (who.admin, who.disabled) == (False, True)
            with pytest.raises(Forbidden):
                await k.call(DisableUser(token=root, username="alice"))
        finally:
            await auth.store.set_disabled("root", False)
        assert (await k.call(WhoAmI(token=root))).admin

        # A user deleted without a cut-off reaching this pod (only its row is gone): its token reads
        # as disabled, also once its name has a new owner (another subject).
        assert (await k.call(WhoAmI(token=tokens["eve"]))).admin
        assert await auth.store.delete_user("eve") is not None
        await k.call(Register(username="eve", password=PASSWORD))
        who = await k.call(WhoAmI(token=tokens["eve"]))
        assert (who.admin, who.disabled) == (False, True)


async def test_whoami_never_grants_admin_without_the_database(
    start_auth: StartAuth, pg_url: str, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_auth(auth_config(pg_url, redis_url, prefix, admin_users=["root"])) as pods:
        k = pods["client"].kernel
        for name in ("root", "alice"):
            await k.call(Register(username=name, password=PASSWORD))
        root = (await k.call(Login(username="root", password=PASSWORD))).access_token
        alice = (await k.call(Login(username="alice", password=PASSWORD))).access_token

        async def down(*_: Any) -> None:
            raise Unavailable("auth: database unavailable (test); retry shortly")

        monkeypatch.setattr(plugin_of(pods["auth"]).store, "find_user", down)
        who = await k.call(WhoAmI(token=alice))  # a non-admin: answered from the token alone
        assert (who.username, who.admin, who.disabled) == ("alice", False, False)
        with pytest.raises(Unavailable):
            await k.call(WhoAmI(token=root))
