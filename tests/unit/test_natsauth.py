"""``aiwfe.kernel.tools.natsauth``: least-privilege NATS users derived from a manifest, their
passwords, the rendered server configuration; and where the shell tools connect."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from aiwfe.bus.nats import user_inbox
from aiwfe.bus.nats_connect import NatsConnectOptions
from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import load_manifest, parse_manifest
from aiwfe.kernel.tools import natsauth
from aiwfe.kernel.tools.embedded import nats_server_binary
from aiwfe.kernel.tools.natsauth import ADMIN, PUBLISHER, inbox_prefix, permissions, pod_user, user_url
from aiwfe.kernel.tools.publish import target

ROOT = Path(__file__).resolve().parents[2]


def test_each_pod_may_publish_what_its_plugins_call_and_serve_what_they_serve() -> None:
    perms = permissions(load_manifest(ROOT / "manifests" / "consolidated.toml", env={}))
    assert set(perms) == {"pod-unified-api-gateway", "pod-cognitive-processing-engine", "pod-background-worker-engine"} | {
        PUBLISHER,
        ADMIN,
    }
    gw, brain, worker = (
        perms[pod_user(p)] for p in ("unified-api-gateway", "cognitive-processing-engine", "background-worker-engine")
    )
    # calls: the gateway calls memory.recall, helios (the worker) calls reasoning; nobody calls memory.forget
    assert "aiwfe.memory.recall" in gw.publish and "aiwfe.memory.forget" not in gw.publish
    assert "aiwfe.reasoning.reason" in worker.publish and "aiwfe.auth.verify" not in worker.publish
    # events: only auth (in the gateway pod) emits auth.revoked; the gateway and auth hear it
    assert "aiwfe.auth.revoked" in gw.publish and "aiwfe.auth.revoked" in gw.subscribe
    assert "aiwfe.auth.revoked" not in brain.publish + worker.publish
    # serving: requests and the submit subjects of the kinds the pod consumes
    assert {"aiwfe.memory.recall", "aiwfe.submit.helios.ask", "aiwfe.status.job"} <= set(brain.subscribe)
    assert "aiwfe.memory.recall" not in gw.subscribe and "aiwfe.submit.helios.ask" not in gw.subscribe
    for user, p in perms.items():
        inboxes = [s for s in p.subscribe if s.startswith("_INBOX")]
        assert inboxes == [f"{inbox_prefix(user)}.>"], user  # nobody reads another's replies
        assert ">" not in p.subscribe and "$JS.API.>" not in p.publish
        assert "$JS.API.STREAM.DELETE.>" in p.publish_deny
    for p in (gw, brain, worker):
        assert p.allow_responses and "aiwfe.jobs.helios.ask" in p.publish and "$KV.AIWFE_RESULTS.>" in p.publish
        assert "$JS.API.CONSUMER.MSG.NEXT.AIWFE_JOBS.>" in p.publish and "$JS.ACK.AIWFE_JOBS.>" in p.publish
    # the external publisher: submit the manifest's kinds and read status, nothing else
    assert perms[PUBLISHER].publish == ("aiwfe.submit.helios.ask", "aiwfe.status.job")
    assert perms[PUBLISHER].subscribe == ("_INBOX.publisher.>",) and not perms[PUBLISHER].allow_responses
    assert perms[ADMIN].subscribe == ("_INBOX.admin.>",) and "aiwfe.>" in perms[ADMIN].publish


def test_a_pod_name_that_cannot_name_a_user_is_refused() -> None:
    m = parse_manifest('[pods."a.b"]\nplugins = ["perception"]\n', env={})
    with pytest.raises(ConfigError, match="a pod name may hold only"):
        permissions(m)


def test_passwords_are_kept_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "d" / "pw.json"
    first = natsauth.load_passwords(path, ["a", "b"])
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(set(first.values())) == 2 and all(len(p) >= 40 for p in first.values())
    again = natsauth.load_passwords(path, ["a", "b", "c"])
    assert {k: again[k] for k in ("a", "b")} == first and again["c"] not in first.values()
    assert json.loads(path.read_text()) == again
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="delete it"):
        natsauth.load_passwords(path, ["a"])


def test_the_rendered_configuration_is_accepted_by_nats_server(tmp_path: Path) -> None:
    m = load_manifest(ROOT / "manifests" / "microservices.toml", env={})
    perms = permissions(m)
    conf = tmp_path / "auth.conf"
    conf.write_text(natsauth.render_config(perms, natsauth.load_passwords(tmp_path / "pw.json", list(perms))))
    r = subprocess.run([nats_server_binary(), "-c", str(conf), "-t"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    block = json.loads(conf.read_text().removeprefix("authorization: "))
    assert {u["user"] for u in block["users"]} == set(perms)
    (gw,) = [u for u in block["users"] if u["user"] == "pod-gateway"]
    assert gw["permissions"]["allow_responses"] == {"max": 1, "expires": natsauth.RESPONSE_WINDOW}


def test_user_urls_and_inboxes() -> None:
    assert user_url("nats://h:1,nats://old:x@h2:2", "pod-a", "p@ss") == "nats://pod-a:p%40ss@h:1,nats://pod-a:p%40ss@h2:2"
    assert user_url("h:4222", "u", "p") == "nats://u:p@h:4222"
    assert user_inbox("nats://pod-a:x@h:1") == "_INBOX.pod-a"
    assert user_inbox("nats://TOKEN@h:1") == "_INBOX"  # a token is a secret, never a subject
    assert user_inbox("nats://h:1", NatsConnectOptions(user="pod-b", password="x")) == "_INBOX.pod-b"
    assert user_inbox("nats://u:p@h:1", NatsConnectOptions(token="t")) == "_INBOX"


def test_shell_tools_find_the_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("AIWFE_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="start `aiwfe up`"):
        target(None, None, str(tmp_path))
    system = {"nats_url": "nats://127.0.0.1:14222", "nats_user": "admin", "nats_password": "pw", "prefix": "sys"}
    (tmp_path / "system.json").write_text(json.dumps(system))
    t = target(None, None, str(tmp_path))
    assert (t.url, t.prefix, t.source) == ("nats://admin:pw@127.0.0.1:14222", "sys", str(tmp_path / "system.json"))
    assert target(None, "other", str(tmp_path)).prefix == "other"
    assert target("nats://x:1", None, str(tmp_path)).url == "nats://x:1"  # --url wins
    monkeypatch.setenv("AIWFE_DATA_DIR", str(tmp_path))
    assert target(None, None, None).prefix == "sys"
    monkeypatch.setenv("AIWFE_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("NATS_URL", "nats://env:2")
    assert (target(None, None, None).url, target(None, None, None).source) == ("nats://env:2", "$NATS_URL")
    (tmp_path / "system.json").write_text("{")
    with pytest.raises(ConfigError, match="not a system file"):
        target(None, None, str(tmp_path))
