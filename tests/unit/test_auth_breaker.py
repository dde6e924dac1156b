"""The circuit breaker that keeps a dead Redis or PostgreSQL from costing every request a timeout."""

from __future__ import annotations

import time

from plugins.auth.store import Breaker


def test_breaker_opens_on_failure_allows_one_probe_per_interval_and_closes_on_success() -> None:
    b = Breaker(open_s=0.05)
    assert b.closed and b.allow() and not b.blocking
    b.failure(ConnectionError("refused"))
    assert not b.closed and b.blocking and b.last_error == "refused"
    assert not b.allow() and not b.allow()  # open: everyone skips the dependency
    time.sleep(0.06)
    assert not b.blocking
    assert b.allow()  # the one probe of this interval
    assert not b.allow() and b.blocking  # the others keep skipping while it runs
    b.failure(TimeoutError())
    assert b.last_error == "TimeoutError" and b.failures == 2
    time.sleep(0.06)
    assert b.allow()
    b.success()
    assert b.closed and b.allow() and b.allow()
