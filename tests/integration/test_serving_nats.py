"""The metadata checks of tests/unit/test_serving.py over a real NATS server: every pod has
its own connection, so the bad headers and preambles cross the server as a hostile
client's would."""

from __future__ import annotations

import pytest

from tests.unit.test_serving import *  # noqa: F403  (the same test bodies, over NATS)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]
