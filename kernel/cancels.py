"""Cancellations a library lost, raised again.

On Python 3.11, ``asyncio.wait_for`` returns the awaited result and drops a cancellation that
lands just as that result arrives. psycopg_pool waits for a connection that way and redis-py
writes each command that way, so a cancelled task (job cancel, deadline) can come back from
them as if nothing had happened. The task still counts the cancellation (``Task.cancelling``),
which is what these two functions read; ``tests/integration/test_services_audit.py`` shows the
losses they catch.
"""

from __future__ import annotations

import asyncio

__all__ = ["cancellations", "raise_if_cancelled_since"]


def cancellations() -> int:
    """The current task's cancellation requests not yet taken back (0 outside a task)."""
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


def raise_if_cancelled_since(before: int) -> None:
    """Raise CancelledError when the current task has more cancellation requests than
    ``before`` (a :func:`cancellations` taken before the library call): one was lost."""
    if cancellations() > before:
        raise asyncio.CancelledError
