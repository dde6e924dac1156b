"""The login throttle's arithmetic and in-memory state, without Redis (the integration tests in
tests/integration/test_auth_throttle.py run it against real Redis and PostgreSQL)."""

from __future__ import annotations

import pytest

from aiwfe.plugins.auth.admin import SubjectDenylist, admin_names
from aiwfe.plugins.auth.errors import TooManyAttempts
from aiwfe.plugins.auth.throttle import LoginThrottle, MemoryCounts


def test_memory_counts_window_lock_and_bound() -> None:
    m = MemoryCounts(window_s=100, max_keys=3)
    assert [m.count("a", now) for now in (0, 10, 20)] == [(1, False), (2, False), (3, False)]
    assert m.failed("a", 20) == 3 and m.count("a", 30) == (4, True)
    assert m.count("a", 200) == (1, False)  # more than the window since the last attempt: forgotten
    m.lock("a", 260)
    assert m.locked_for("a", 250) == 10 and m.locked_for("a", 270) == 0
    for k in ("b", "c", "d"):
        m.count(k, 300)
    assert m.locked_for("a", 250) == 0  # the oldest key made room (bounded memory)
    m.uncount("b")
    assert m.count("b", 301) == (1, False)
    m.clear("c")
    assert m.count("c", 302) == (1, False)


def test_backoff_doubles_up_to_the_cap() -> None:
    t = LoginThrottle(None, prefix="p", user_free=3, addr_free=10, base_s=1.0, max_s=60.0)
    assert [t.delay_s("user", n) for n in range(1, 11)] == [0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert t.delay_s("addr", 9) == 0 and t.delay_s("addr", 10) == 1
    assert t.delay_s("user", 10_000) == 60  # no overflow


async def test_without_redis_the_pod_throttles_on_its_own_count() -> None:
    t = LoginThrottle(None, prefix="p", user_free=2, addr_free=100, base_s=30.0)
    await t.admit("Mallory", "10.0.0.1")
    await t.failed("Mallory", "10.0.0.1")
    await t.admit("mallory", "10.0.0.2")  # the name counts whatever the case; dirty, at the allowance: locks
    with pytest.raises(TooManyAttempts) as e:
        await t.admit("MALLORY", "10.0.0.3")  # refused while the second guess is still in flight
    assert 1 <= e.value.retry_after_s <= 30
    await t.admit("someone-else", "10.0.0.1")
    await t.succeeded("mallory", "10.0.0.2")  # the in-flight one was right: the name is clean again
    await t.admit("mallory", "10.0.0.1")


async def test_a_clean_name_admits_a_burst_and_its_failures_lock_it() -> None:
    t = LoginThrottle(None, prefix="p", user_free=3, addr_free=100, base_s=30.0)
    for _ in range(10):
        await t.admit("nina", "")
    await t.failed("nina", "")  # ten in flight, one wrong: 10 ≥ 3, locked at once
    with pytest.raises(TooManyAttempts):
        await t.admit("nina", "")


async def test_released_and_successful_attempts_do_not_lock_an_address() -> None:
    t = LoginThrottle(None, prefix="p", user_free=100, addr_free=3, base_s=30.0)
    await t.admit("user-0", "192.0.2.7")
    await t.failed("user-0", "192.0.2.7")  # the address is dirty: strict from here
    for i in range(1, 10):
        await t.admit(f"user{i}", "192.0.2.7")
        await (t.succeeded if i % 2 else t.release)(f"user{i}", "192.0.2.7")
    await t.admit("user-x", "192.0.2.7")  # count 2: below the allowance of 3


def test_subject_cutoffs_and_admin_names(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    d = SubjectDenylist()
    now = int(time.time())
    d.add("u1", now, now + 3600)
    assert d.denies("u1", now) and d.denies("u1", now - 100) and not d.denies("u1", now + 1)
    assert not d.denies("u2", now) and d.before("u1") == now
    d.add("u1", now - 50, now + 10)  # an older cut-off never loosens a newer one
    assert d.denies("u1", now)
    d.add("gone", now, now - 1)  # already expired: not kept
    assert d.before("gone") is None
    monkeypatch.setenv("AIWFE_ADMIN_USERS", " Ops, root ,,")
    assert admin_names(["Alice"]) == {"alice", "ops", "root"}
    monkeypatch.delenv("AIWFE_ADMIN_USERS")
    assert admin_names([]) == frozenset()


def test_config_checks() -> None:
    from aiwfe.plugins.auth.plugin import AuthPlugin

    bad = AuthPlugin.Config(login_user_attempts=0, login_window_s=-1, login_backoff_s=10, login_max_backoff_s=5)
    problems = " ".join(map(str, AuthPlugin.validate_config(bad)))
    assert "login_user_attempts: must be positive" in problems and "login_window_s: must be positive" in problems
    assert "login_max_backoff_s: must be at least login_backoff_s" in problems
    assert AuthPlugin.validate_config(AuthPlugin.Config()) == []


async def test_address_limit_off() -> None:
    t = LoginThrottle(None, prefix="p", user_free=100, addr_free=0, base_s=30.0)
    for i in range(10):
        await t.admit(f"u{i}", "198.51.100.4")
        await t.failed(f"u{i}", "198.51.100.4")
    await t.admit("u-next", "198.51.100.4")
