"""The auth tests' pods and helpers (tests/integration/test_auth*.py): ``start_auth`` starts
pods ``auth`` and ``client`` on the bus ``bus_kind`` names (``local`` or ``nats``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from aiwfe.kernel import metrics
from aiwfe.kernel.errors import RemoteError
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.auth.plugin import AuthPlugin

WHO = "tests.support.probe:WhoPlugin"
SECRET = "test-secret-" + "x" * 32
PASSWORD = "correct horse battery"

StartAuth = Callable[..., contextlib.AbstractAsyncContextManager[dict[str, PodRunner]]]


def auth_config(pg_url: str, redis_url: str, prefix: str, **over: Any) -> dict[str, Any]:
    """Plugin config for tests: a cheap KDF, this test's own Redis key prefix."""
    cfg: dict[str, Any] = {
        "database_url": pg_url,
        "redis_url": redis_url,
        "redis_key_prefix": prefix,
        "jwt_secret": SECRET,
        "kdf_time_cost": 1,
        "kdf_memory_kib": 8192,
        "kdf_parallelism": 1,
        "pool_timeout_s": 1.0,
        "redis_retry_s": 0.3,
    }
    cfg.update(over)
    return cfg


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def plugin_of(pod: PodRunner) -> AuthPlugin:
    p = pod.plugins["auth"]
    assert isinstance(p, AuthPlugin)
    return p


async def expect_invalid(call: Any, error_type: str, starts: str) -> str:
    with pytest.raises(RemoteError) as e:
        await call
    assert e.value.type == error_type, e.value
    assert e.value.message.startswith(starts), e.value.message
    assert not e.value.retryable
    return e.value.message
