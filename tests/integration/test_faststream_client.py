"""The FastStream example client (examples/faststream_client/client.py) against real pods
on a real NATS server: it submits JSON jobs on ``<prefix>.submit.<kind>``, follows their
events on ``<prefix>.status.job`` and prints the result, all as JSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from tests.support.pods import StartPods
from tests.unit.test_routing import TWO_PODS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "examples" / "faststream_client" / "client.py"


def client(url: str, prefix: str, kind: str, job: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the example as a user would (its own process, nothing of aiwfe imported)."""
    where = [*(["--url", url] if url else []), *(["--prefix", prefix] if prefix else [])]
    args = [sys.executable, str(CLIENT), *where, "--kind", kind, "--timeout", "60", *extra, job]
    return subprocess.run(args, capture_output=True, text=True, timeout=90, cwd=ROOT)


async def test_faststream_client_submits_follows_and_reads_the_result(start_pods: StartPods, nats_url: str, prefix: str) -> None:
    async with start_pods(TWO_PODS):
        ok, bad = await asyncio.gather(
            asyncio.to_thread(client, nats_url, prefix, "probe.crunch", '{"n": 6, "delay_s": 0.2}', "--key", "order-1"),
            asyncio.to_thread(client, nats_url, prefix, "probe.crunch", '{"n": "six"}'),
        )
        assert ok.returncode == 0, ok.stderr
        lines = [json.loads(line) for line in ok.stdout.splitlines()]
        events, outcome = lines[:-1], lines[-1]
        assert outcome["status"] == "done" and outcome["result"]["n"] == 6 and outcome["result"]["square"] == 36
        assert events[0]["type"] == "probe.progressed" and events[-1]["type"] == "job.done"
        assert events[0]["data"] == {"type": "probe.progressed", "n": 6, "step": "started"}
        assert events[-1]["data"]["square"] == 36 and [e["seq"] for e in events] == sorted(e["seq"] for e in events)
        assert bad.returncode == 1
        error = json.loads(bad.stdout)["error"]
        assert error["type"] == "BadInput" and "Expected `int`, got `str` - at `$.n`" in error["message"]
        # the same idempotency key names the same job, already done
        again = await asyncio.to_thread(client, nats_url, prefix, "probe.crunch", '{"n": 6}', "--key", "order-1")
        assert json.loads(again.stdout.splitlines()[-1])["job_id"] == outcome["job_id"]


async def test_faststream_client_as_the_publisher_user(tmp_path: Path) -> None:
    """With authorization on, as ``aiwfe up`` runs it (users and permissions derived from the
    manifest): every pod as its own NATS user, the client as ``publisher``, which may publish
    only the submit and status subjects and read only its own inbox."""
    import nats
    import nats.errors

    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.tools.natsauth import PUBLISHER
    from aiwfe.kernel.tools.up import write_system
    from tests.support.servers import secured_nats

    prefix = "fs" + tmp_path.name[-8:].lower().replace("_", "")
    m = parse_manifest(TWO_PODS.replace("{prefix}", prefix), env={})
    with secured_nats(m, tmp_path) as sec:
        runners = [PodRunner(m, name, NatsBus(sec.pod_url(name), prefix, name=name), ops_port=0) for name in m.pods]
        async with contextlib.AsyncExitStack() as stack:
            for r in runners:
                await stack.enter_async_context(r)
            pub_url = sec.url(PUBLISHER)
            # the system.json `aiwfe up` writes: --system takes the publisher's credentials and the prefix from it
            system = write_system(tmp_path, m, {"NATS_URL": sec.server.url}, sec.auth)
            ok, bad = await asyncio.gather(
                asyncio.to_thread(client, "", "", "probe.crunch", '{"n": 4}', "--system", str(system)),
                asyncio.to_thread(client, pub_url, prefix, "probe.crunch", '{"n": []}'),
            )
            assert ok.returncode == 0, ok.stdout + ok.stderr
            outcome = json.loads(ok.stdout.splitlines()[-1])
            assert outcome["status"] == "done" and outcome["result"]["square"] == 16
            assert json.loads(ok.stdout.splitlines()[0])["type"] == "probe.progressed"
            assert bad.returncode == 1 and "$.n" in json.loads(bad.stdout)["error"]["message"]
            # and nothing else: not the jobs stream, not the bucket, not another inbox
            errors: list[Exception] = []

            async def on_error(e: Exception) -> None:
                errors.append(e)

            nc = await nats.connect(pub_url, inbox_prefix=f"_INBOX.{PUBLISHER}", error_cb=on_error)
            try:
                await nc.publish(f"{prefix}.jobs.probe.crunch", b'{"n": 1}')
                await nc.subscribe("_INBOX.>")
                await nc.flush()
                await asyncio.sleep(0.3)
            finally:
                await nc.close()
            assert sum("permissions violation" in str(e).lower() for e in errors) == 2, errors
