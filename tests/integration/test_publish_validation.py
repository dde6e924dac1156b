"""``aiwfe publish`` as an external publisher: jobs go through ``<prefix>.submit.<kind>``
(validated by the consumer's pod), unknown kinds and subjects fail with the known kinds,
``--wait`` follows ``<prefix>.status.job``. Real pods on a real NATS server."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.integration.test_nats_bus import _publish
from tests.support.pods import StartPods
from tests.unit.test_routing import TWO_PODS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


async def test_publish_validates_jobs_and_names_the_known_kinds(start_pods: StartPods, nats_url: str, prefix: str) -> None:
    async with start_pods(TWO_PODS):
        runs = await asyncio.gather(
            asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.jobs.nosuch.kind", "{}"),
            asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.submit.probe.crunch", '{"n": "nine"}'),
            asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.nosuch.op", "{}"),
            asyncio.to_thread(_publish, nats_url, prefix, f"{prefix}.submit.probe.crunch", '{"n": 9}', "--wait"),
        )
        unknown, bad, rpc, ok = runs
        assert unknown.returncode == 1, unknown.stdout
        err = json.loads(unknown.stdout)["error"]
        assert err["code"] == "unknown_kind" and "nosuch.kind" in err["message"]
        assert "known job kinds: probe.crunch" in err["message"]
        assert bad.returncode == 1
        err = json.loads(bad.stdout)["error"]
        assert err["code"] == "bad_input" and "Expected `int`, got `str` - at `$.n`" in err["message"]
        assert rpc.returncode == 1 and "known job kinds: probe.crunch" in json.loads(rpc.stdout)["error"]["message"]
        assert ok.returncode == 0, ok.stderr
        lines = [json.loads(x) for x in ok.stdout.splitlines()]
        assert lines[1]["job_id"] == lines[0]["job_id"] and lines[1]["status"] == "done"
        assert lines[1]["result"]["square"] == 81 and lines[1]["events"] >= 2
