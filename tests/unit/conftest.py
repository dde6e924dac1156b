"""Fixtures of the unit tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.pods import StartPods, running


@pytest.fixture
def start_pods(prefix: str) -> StartPods:
    """Start every pod of a manifest on one shared LocalBus."""

    @contextlib.asynccontextmanager
    async def start(text: str) -> AsyncIterator[dict[str, PodRunner]]:
        m = parse_manifest(text.replace("{prefix}", prefix), env={})
        async with running(m) as pods:
            yield pods

    return start
