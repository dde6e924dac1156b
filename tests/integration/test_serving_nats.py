"""The metadata checks of tests/unit/test_serving.py over a real NATS server: every pod has
its own connection, so the bad headers and preambles cross the server as a hostile
client's would."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.pods import StartPods, running
from tests.unit.test_serving import *  # noqa: F403  (the same test bodies, over NATS)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


@pytest.fixture
def start_pods(prefix: str, nats_url: str) -> StartPods:  # overrides the LocalBus fixture
    """Start every pod of a manifest, each with its own NATS connection."""

    @contextlib.asynccontextmanager
    async def start(text: str) -> AsyncIterator[dict[str, PodRunner]]:
        m = parse_manifest(text.replace("{prefix}", prefix), env={})
        async with running(m, nats_url=nats_url) as pods:
            yield pods

    return start
