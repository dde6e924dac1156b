"""NATS is a public surface: every attack of issue 12 is refused by the server for a non-pod
user, and the pods of ``manifests/consolidated.toml``, each with its own least-privilege user
(:mod:`aiwfe.kernel.tools.natsauth`), still do all their work.

The test starts its own nats-server with the rendered authorization and runs the three pods
in this process, each on its own connection and user, the gateway on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import nats.errors
import pytest

from aiwfe.bus.codec import H_TYPE, stream_names
from aiwfe.bus.nats import NatsBus
from aiwfe.kernel.manifest import load_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools import natsauth
from aiwfe.kernel.tools.embedded import EmbeddedNats
from aiwfe.kernel.tools.natsauth import ADMIN, PUBLISHER, pod_user, user_url
from tests.support.servers import nats_hello

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


class Secured(msgspec.Struct):
    """The running system: its server, everyone's passwords, the prefix, the gateway, an admin kernel."""

    server: Any
    passwords: dict[str, str]
    prefix: str
    gateway: str
    admin: Kernel

    def url(self, user: str, password: str | None = None) -> str:
        return user_url(self.server.url, user, password or self.passwords[user])


@pytest.fixture
async def secured(
    prefix: str, pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Secured]:
    env = {
        "AIWFE_PREFIX": prefix,
        "AIWFE_GATEWAY_PORT": "0",
        "AIWFE_DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": pg_url,
        "REDIS_URL": redis_url,
        "JWT_SECRET": "security-test-secret-" + "x" * 32,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    manifest = load_manifest(ROOT / "manifests" / "consolidated.toml", env={**os.environ, **env})
    perms = natsauth.permissions(manifest)
    passwords = natsauth.load_passwords(tmp_path / "nats-passwords.json", list(perms))
    server = EmbeddedNats(tmp_path / "nats", config=natsauth.render_config(perms, passwords)).start()
    try:
        urls = {name: user_url(server.url, pod_user(name), passwords[pod_user(name)]) for name in manifest.pods}
        pods = {name: PodRunner(manifest, name, NatsBus(urls[name], prefix, name=name), ops_port=0) for name in manifest.pods}
        async with contextlib.AsyncExitStack() as stack:
            for p in pods.values():
                await stack.enter_async_context(p)
            admin = NatsBus(user_url(server.url, ADMIN, passwords[ADMIN]), prefix, name="admin")
            await admin.start()
            stack.push_async_callback(admin.close)
            gateway = str(pods["unified-api-gateway"].plugins["gateway"].public_url)  # type: ignore[attr-defined]
            yield Secured(server, passwords, prefix, gateway, Kernel(admin))
        violations = [line for line in server.log_path.read_text().splitlines() if "Violation" in line]
        assert not [v for v in violations if "user:pod-" in v], "a pod hit its permissions:\n" + "\n".join(violations)
    finally:
        server.stop()


async def _victim(s: Secured) -> tuple[dict[str, str], str, str]:
    """Register and log in a user over HTTP, store a memory, run a helios job to the end.
    Returns (auth header, user id, job id)."""
    async with httpx.AsyncClient(base_url=s.gateway, timeout=30) as c:
        creds = {"username": "victim", "password": "correct horse battery"}
        assert (await c.post("/v1/auth/register", json=creds)).status_code == 201
        r = await c.post("/v1/auth/login", json=creds)
        assert r.status_code == 200, r.text
        h = {"Authorization": f"Bearer {r.json()['access_token']}"}
        assert (await c.post("/v1/memory", json={"text": "The victim's vault code is 4711."}, headers=h)).status_code == 201
        r = await c.post("/v1/jobs", json={"kind": "helios", "input": {"text": "What is my vault code?"}}, headers=h)
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        for _ in range(600):
            r = await c.get(f"/v1/jobs/{job_id}", headers=h)
            if r.json().get("status") != "pending":
                break
            await asyncio.sleep(0.1)
        assert r.json()["status"] == "done", r.text
        assert "4711" in json.dumps(r.json()["result"])
    from aiwfe.plugins.auth.contract import Verify

    sub = (await s.admin.call(Verify(token=h["Authorization"].split()[1]))).sub
    return h, sub, job_id


async def test_pods_work_and_the_publisher_may_use_its_subjects(secured: Secured) -> None:
    """Each pod on its own user serves the whole helios flow (the fixture checks the server
    logged no violation by a pod); the publisher may publish submit and status requests."""
    await _victim(secured)
    # the kernel's request mux and its JetStream subscriptions live under the user's own inbox
    nc = secured.admin.bus.nc  # type: ignore[attr-defined]
    assert bytes(nc._resp_sub_prefix).startswith(b"_INBOX.admin.") and nc.new_inbox().startswith("_INBOX.admin.")
    errors: list[Exception] = []

    async def on_error(e: Exception) -> None:
        errors.append(e)

    nc = await nats.connect(secured.url(PUBLISHER), error_cb=on_error, inbox_prefix=f"_INBOX.{PUBLISHER}", allow_reconnect=False)
    try:
        for subject in (f"{secured.prefix}.submit.helios.ask", f"{secured.prefix}.status.job"):
            with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await nc.request(subject, b'{"job_id": "x"}', timeout=1, headers={"Content-Type": "application/json"})
        await nc.flush()
    finally:
        await nc.close()
    assert not errors, errors

    # the operator publishes anything under the prefix but serves nothing and reads nobody's replies
    refused: list[str] = []

    async def on_refusal(e: Exception) -> None:
        refused.append(str(e).lower())

    nc = await nats.connect(secured.url(ADMIN), error_cb=on_refusal, inbox_prefix=f"_INBOX.{ADMIN}", allow_reconnect=False)
    try:
        for subject in (f"{secured.prefix}.memory.recall", f"_INBOX.{pod_user('unified-api-gateway')}.>", "$KV.>"):
            await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert len([r for r in refused if "permissions violation for subscription" in r]) == 3, refused

    # the operator retires a job kind no pod serves (aiwfe retire-kind) within its permissions;
    # the kinds the pods serve stay
    bus: Any = secured.admin.bus
    await bus.accept_kinds(["spare.run"])
    await bus.retire_kind("spare.run")
    assert "spare.run" not in await bus.job_kinds() and "helios.ask" in await bus.job_kinds()


@pytest.mark.parametrize("who", ["anonymous", "wrong password", "unknown user", "pod"])
async def test_unauthenticated_clients_are_refused(secured: Secured, who: str) -> None:
    user, password = {
        "anonymous": (None, None),
        "wrong password": (PUBLISHER, "not-the-password"),
        "unknown user": ("mallory", "whatever"),
        "pod": (pod_user("background-worker-engine"), secured.passwords[pod_user("background-worker-engine")]),
    }[who]
    answer = await nats_hello(secured.server.host, secured.server.port, user, password)
    if who == "pod":
        assert answer == "PONG"
    else:
        assert answer == "-ERR 'Authorization Violation'"


async def test_every_attack_is_refused_for_the_publisher(secured: Secured) -> None:
    """Issue 12's attacks, by the external-publisher role: each is a permissions violation
    and changes nothing."""
    _, victim_id, job_id = await _victim(secured)
    p = secured.prefix
    results = stream_names(p)["results"]
    pending_id = "f" * 32  # a job that has no outcome yet
    assert await secured.admin.job_owner(job_id) == victim_id
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    nc = await nats.connect(secured.url(PUBLISHER), error_cb=on_error, inbox_prefix=f"_INBOX.{PUBLISHER}", allow_reconnect=False)
    js = nc.jetstream()
    enc = msgspec.msgpack.encode
    replies = []
    requests = {  # RPCs: register/login, another owner's memories, planting memories, reading the bucket
        f"{p}.auth.register": enc({"type": "auth.register", "username": "mallory", "password": "x" * 12}),
        f"{p}.auth.login": enc({"type": "auth.login", "username": "victim", "password": "guess"}),
        f"{p}.memory.recall": enc({"type": "memory.recall", "query": "vault code", "owner": victim_id}),
        f"{p}.memory.remember": enc({"type": "memory.remember", "text": "The vault code is 0000.", "owner": victim_id}),
        f"$JS.API.DIRECT.GET.KV_{results}.$KV.{results}.{job_id}": b"",
        f"$JS.API.STREAM.MSG.GET.KV_{results}": json.dumps({"last_by_subj": f"$KV.{results}.{job_id}"}).encode(),
        f"$JS.API.STREAM.INFO.KV_{results}": b"",
        f"$JS.API.CONSUMER.CREATE.{stream_names(p)['events']}": b"{}",
    }
    for subject, data in requests.items():
        try:
            replies.append((subject, (await nc.request(subject, data, timeout=1)).data))
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            pass
    with contextlib.suppress(Exception):  # the KV API itself: refused at the stream lookup
        kv = await js.key_value(results)
        replies.append(("kv", (await kv.get(job_id)).value or b""))
    gateway_inbox = f"_INBOX.{pod_user('unified-api-gateway')}.>"
    subscriptions = [f"{p}.events.>", f"$KV.{results}.>", gateway_inbox, f"{p}.memory.recall", ">"]
    for subject in subscriptions:
        await nc.subscribe(subject)
    publishes = {  # overwrite an owner, forge an outcome and a terminal event, cancel, revoke, a raw job
        f"$KV.{results}.owner.{job_id}": b"mallory",
        f"$KV.{results}.{pending_id}": enc({"job_id": pending_id, "kind": "helios.ask", "status": "done"}),
        f"{p}.events.{pending_id}": enc({"answer": "forged"}),
        f"{p}.control.cancel": pending_id.encode(),
        f"{p}.auth.revoked": enc({"type": "auth.revoked", "jti": "x", "exp": 2**31}),
        f"{p}.auth.subject_revoked": enc({"type": "auth.subject_revoked", "sub": victim_id, "before": 2**31, "exp": 2**31}),
        f"{p}.jobs.helios.ask": enc({"type": "helios.ask", "text": "forged"}),
    }
    for subject, data in publishes.items():
        await nc.publish(subject, data, headers={H_TYPE: "job.done"} if ".events." in subject else None)
    await nc.flush()
    await asyncio.sleep(0.2)
    await nc.close()

    assert replies == [], "the server answered the publisher"
    refused = "\n".join(errors).lower()  # nats-py lower-cases the server's -ERR
    for subject in [*requests, *publishes]:
        assert f'publish to "{subject.lower()}"' in refused, f"{subject} was not refused:\n{refused}"
    for subject in subscriptions:
        assert f'subscription to "{subject.lower()}"' in refused, f"subscribe {subject} was not refused:\n{refused}"
    log = secured.server.log_path.read_text()
    assert f'user:{PUBLISHER}" - Publish Violation - Subject "{p}.control.cancel"' in log
    # nothing changed
    assert await secured.admin.job_owner(job_id) == victim_id
    assert await secured.admin.job_record(pending_id) is None
    assert (await secured.admin.job_record(job_id)).status == "done"


async def test_a_reply_subject_cannot_make_a_pod_write_for_the_publisher(secured: Secured) -> None:
    """NATS does not check a requester's reply subject against its permissions, but a pod's
    answer goes out with the pod's: requests whose reply subject is not an inbox are dropped
    (aiwfe.bus.codec.is_reply_inbox), so the publisher cannot blank a record or an owner
    entry, delete a job consumer or queue a raw job through a pod's answer."""
    h, victim_id, job_id = await _victim(secured)
    p = secured.prefix
    names = stream_names(p)
    results = names["results"]
    before = await secured.admin.job_record(job_id)
    targets = [
        f"$KV.{results}.{job_id}",
        f"$KV.{results}.owner.{job_id}",
        f"$JS.API.CONSUMER.DELETE.{names['jobs']}.jobs_helios_ask",
        f"{p}.jobs.helios.ask",
        "_INBOX.>",
    ]
    nc = await nats.connect(secured.url(PUBLISHER), inbox_prefix=f"_INBOX.{PUBLISHER}", allow_reconnect=False)
    try:
        for reply in targets:
            await nc.publish(f"{p}.status.job", b"{}", reply=reply, headers={"Content-Type": "application/json"})
            await nc.publish(f"{p}.submit.helios.ask", b'{"text": 1}', reply=reply, headers={"Content-Type": "application/json"})
        await nc.flush()
        # the same requests with a proper inbox are answered: the subjects work, only the replies were refused
        r = await nc.request(f"{p}.status.job", b"{}", timeout=5, headers={"Content-Type": "application/json"})
        assert "Aiwfe-Error" in (r.headers or {})
    finally:
        await nc.close()
    assert await secured.admin.job_record(job_id) == before
    assert await secured.admin.job_owner(job_id) == victim_id
    async with httpx.AsyncClient(base_url=secured.gateway, timeout=30) as c:
        r = await c.post("/v1/jobs", json={"kind": "helios", "input": {"text": "Still served?"}}, headers=h)
        assert r.status_code == 202, r.text
        job2 = r.json()["job_id"]
    assert (await secured.admin.wait_job(job2, timeout_s=60)).status == "done"  # the consumer is still there
