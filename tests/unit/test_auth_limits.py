"""Limits of the auth plugin: the circuit breaker (a dead Redis or PostgreSQL costs no request
a timeout) and the KDF gate (a burst of logins is refused at once, not queued for seconds)."""

from __future__ import annotations

import time

import pytest

from aiwfe.kernel.errors import Overloaded
from aiwfe.plugins.auth.plugin import KdfGate
from aiwfe.plugins.auth.store import Breaker


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


def test_kdf_gate_admits_what_finishes_within_the_wait_and_refuses_the_rest_at_once() -> None:
    gate = KdfGate(workers=2, max_wait_s=1.0, avg_s=0.25)
    held = []
    for _ in range(8):  # ceil(8 / 2) * 0.25 s = 1.0 s: still admitted
        cm = gate.slot()
        cm.__enter__()
        held.append(cm)
    assert gate.pending == 8 and gate.expected_wait_s() == 1.25
    with pytest.raises(Overloaded, match="password hashing saturated") as e:
        with gate.slot():
            pass
    assert e.value.retryable and gate.pending == 8
    held.pop().__exit__(None, None, None)
    with gate.slot():
        assert gate.pending == 8
    for cm in held:
        cm.__exit__(None, None, None)
    assert gate.pending == 0


def test_kdf_gate_always_admits_one_and_learns_the_hash_time() -> None:
    gate = KdfGate(workers=1, max_wait_s=0.01, avg_s=5.0)
    with gate.slot():  # a hash slower than the wait is still served when nothing is pending
        assert gate.pending == 1
    for _ in range(30):
        gate.observe(0.001)
    assert gate.avg_s < 0.01


def test_kdf_gate_staggers_the_retries_of_callers_refused_together() -> None:
    gate = KdfGate(workers=2, max_wait_s=1.0, avg_s=0.5)
    held = [gate.slot() for _ in range(4)]  # ceil(5 / 2) * 0.5 = 1.5 s > 1 s: the 5th is refused
    for cm in held:
        cm.__enter__()
    hints = []
    for _ in range(10):
        with pytest.raises(Overloaded) as e:
            with gate.slot():
                pass
        hints.append(e.value.retry_after_s)
    # two workers: every second refused caller is told to come one hash time (0.5 s) later,
    # in whole seconds (Retry-After's unit): 1, 1, 1.5, 1.5, 2, 2, 2.5, 2.5, 3, 3 rounded up
    assert hints == [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0], hints
    assert len(gate.promised) == 10 and gate.pending == 4
    gate.promised[:] = [t - 100 for t in gate.promised]  # those times have come: forgotten
    with pytest.raises(Overloaded) as e:
        with gate.slot():
            pass
    assert e.value.retry_after_s == 1.0 and len(gate.promised) == 1
    for cm in held:
        cm.__exit__(None, None, None)
