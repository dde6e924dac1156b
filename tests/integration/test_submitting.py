"""The submit and status subjects of tests/unit/test_submitting.py over a real NATS server
(each pod its own connection), and the jobs stream's subjects: only accepted kinds, added
by pods starting at once, narrowed from the old catch-all."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import nats.js.errors
import pytest
from nats.js import api

from aiwfe.bus.codec import stream_names
from aiwfe.bus.errors import NotAccepted
from aiwfe.bus.nats import NatsBus
from tests.unit.test_submitting import *  # noqa: F403  (the same bodies, over NATS)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


async def test_pods_starting_at_once_all_get_their_kinds_in_the_stream(nats_url: str, prefix: str) -> None:
    buses = [NatsBus(nats_url, prefix, name=f"b{i}") for i in range(4)]
    await asyncio.gather(*(b.start() for b in buses))
    try:
        await asyncio.gather(*(b.accept_kinds([f"k{i}.run", "shared.run"]) for i, b in enumerate(buses)))
        assert await buses[0].job_kinds() == ["k0.run", "k1.run", "k2.run", "k3.run", "shared.run"]
        assert await buses[1].enqueue("k2.run", b"x", {}, "m1")
        with pytest.raises(NotAccepted, match="no stream takes this kind"):
            await buses[1].enqueue("k9.run", b"x", {}, "m2")
    finally:
        await asyncio.gather(*(b.close() for b in buses))


async def test_a_pod_losing_the_race_to_create_the_results_bucket_binds_the_winners(nats_url: str, prefix: str) -> None:
    """The loser of the race looked the bucket up before the winner created it; its own create
    is then refused (on 2.9 "subjects overlap", here a different TTL), and it binds the winner's."""
    winner = NatsBus(nats_url, prefix, name="winner")
    await winner.start()
    loser = NatsBus(nats_url, prefix, name="loser", result_ttl_s=123.0)
    await loser.start()
    try:
        looked_up = loser.js.key_value
        calls = []

        async def first_lookup_misses(bucket: str):  # the lookup that ran before the winner's create
            calls.append(bucket)
            if len(calls) == 1:
                raise nats.js.errors.BucketNotFoundError
            return await looked_up(bucket)

        loser.js.key_value = first_lookup_misses  # type: ignore[method-assign]
        bucket = stream_names(prefix)["results"]
        kv = await loser._results_bucket(bucket)
        assert calls == [bucket, bucket]
        assert (await kv.status()).ttl == winner.result_ttl_s  # the winner's bucket, not a second one
        assert await winner.kv_create("j1", b"done")
        assert await loser.kv_get("j1") == b"done"
    finally:
        await asyncio.gather(winner.close(), loser.close())


async def test_the_old_catch_all_subject_is_narrowed_to_the_kinds(nats_url: str, prefix: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = stream_names(prefix)["jobs"]
        await js.add_stream(api.StreamConfig(name=name, subjects=[f"{prefix}.jobs.>"], retention=api.RetentionPolicy.WORK_QUEUE))
        bus = NatsBus(nats_url, prefix)
        await bus.start()
        try:
            await bus.accept_kinds(["a.b"])
            assert (await js.stream_info(name)).config.subjects == [f"{prefix}.jobs.a.b"]
        finally:
            await bus.close()
    finally:
        await nc.close()


async def test_a_kind_no_pod_serves_any_more_can_be_retired(nats_url: str, prefix: str) -> None:
    """`aiwfe retire-kind`: refused while jobs of the kind are queued; an empty kind leaves the
    stream's subjects (its consumer deleted) and is then refused at submit like any unknown
    kind; the stream's only kind stays; a pod serving the kind adds it back."""
    import json
    import subprocess
    import sys

    bus = NatsBus(nats_url, prefix, name="retire")
    await bus.start()
    try:
        await bus.accept_kinds(["keep.run", "gone.run", "busy.run"])
        assert await bus.enqueue("busy.run", b"x", {}, "m1")
        with pytest.raises(NotAccepted, match="1 job\\(s\\) still queued"):
            await bus.retire_kind("busy.run")

        def cli(*kinds: str) -> tuple[int, list[dict[str, object]]]:
            cmd = [sys.executable, "-m", "aiwfe.kernel.tools.cli", "retire-kind", *kinds, "--url", nats_url, "--prefix", prefix]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            return p.returncode, [json.loads(line) for line in p.stdout.splitlines()]

        code, lines = await asyncio.to_thread(cli, "gone.run", "busy.run", "never.run")
        assert code == 1, lines
        assert lines[0] == {"kind": "gone.run", "retired": True}
        assert lines[1]["kind"] == "busy.run" and lines[1]["retired"] is False and "still queued" in str(lines[1]["why"])
        assert lines[2] == {"kind": "never.run", "retired": False, "why": "the jobs stream does not take it"}
        assert await bus.job_kinds() == ["busy.run", "keep.run"]
        with pytest.raises(NotAccepted, match="no stream takes this kind"):
            await bus.enqueue("gone.run", b"x", {}, "m2")
        code, _ = await asyncio.to_thread(cli, "Not A Kind")
        assert code == 2
        await bus.accept_kinds(["gone.run"])  # a pod serving it again adds it back
        assert await bus.job_kinds() == ["busy.run", "gone.run", "keep.run"]

        other = NatsBus(nats_url, prefix + "x", name="retire-last")  # a stream with one kind
        await other.start()
        try:
            await other.accept_kinds(["only.run"])
            with pytest.raises(NotAccepted, match="only kind stays"):
                await other.retire_kind("only.run")
            assert await other.job_kinds() == ["only.run"]
        finally:
            names = stream_names(prefix + "x")  # this bus's own streams: the fixture cleans only the test's prefix
            for stream in (names["jobs"], names["events"], names["dlq"], f"KV_{names['results']}"):
                with contextlib.suppress(Exception):
                    await other.js.delete_stream(stream)
            await other.close()
    finally:
        await bus.close()
