"""Building and starting the gateway leaves the pod's logging configuration alone.

The pod's CLI configures logging once; neither Litestar (``logging_config=None``) nor the
embedded server (uvicorn ``log_config=None``, granian's incremental config) may add a second
format: no handler added to or removed from any logger, no logger disabled, the root level kept.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from tests.unit.test_gateway_http import StartGateway
from tests.unit.test_gateway_http import gateway as gateway  # the fixture


def _snapshot() -> dict[str, Any]:
    loggers = {name: lg for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    return {
        "root_level": logging.getLogger().level,
        "root_handlers": list(logging.getLogger().handlers),
        "handlers": {name: list(lg.handlers) for name, lg in loggers.items() if lg.handlers},
        "disabled": sorted(name for name, lg in loggers.items() if lg.disabled),
    }


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
async def test_building_and_starting_the_gateway_leaves_logging_alone(gateway: StartGateway, server: str) -> None:
    root = logging.getLogger()
    pod_handler = logging.StreamHandler()  # stands in for the one the pod's CLI installs
    old_level = root.level
    root.addHandler(pod_handler)
    root.setLevel(logging.INFO)
    try:
        before = _snapshot()
        async with gateway(f'server = "{server}"') as s, httpx.AsyncClient(base_url=s.url) as c:
            assert (await c.get("/health")).status_code == 200
            assert _snapshot() == before
        assert _snapshot() == before
    finally:
        root.removeHandler(pod_handler)
        root.setLevel(old_level)
