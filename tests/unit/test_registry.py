from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec

from aiwfe.kernel import Plugin, Reply, Request, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.plugin import validate_plugin_class
from aiwfe.kernel.registry import discover
from aiwfe.kernel.tools.check import check_manifests


class R(Reply):
    v: int


class Ping(Request[R], tag="vt.ping"):
    pass


class Unserved(Request[R], tag="vt.unserved"):
    pass


class Server(Plugin):
    name = "server"

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        level: int = 1

    @serves(Ping)
    async def ping(self, req: Ping) -> R:
        return R(v=1)


class Twin(Plugin):
    name = "twin"

    @serves(Ping)
    async def ping(self, req: Ping) -> R:
        return R(v=2)


class Caller(Plugin):
    name = "caller"
    calls = (Ping, Unserved)


class BadSignatures(Plugin):
    name = "bad"

    @serves(Ping)
    def not_async(self, req: Ping) -> R:  # type: ignore[misc]
        return R(v=0)

    @serves(Ping)
    async def two_args(self, req: Ping, extra: int) -> R:
        return R(v=0)

    @serves(Ping)
    async def wrong_return(self, req: Ping) -> int:
        return 0


HERE = "tests.unit.test_registry"


def test_in_repo_plugins_register_through_entry_points() -> None:
    found = discover()
    assert found["perception"] == "aiwfe.plugins.perception.plugin:PerceptionPlugin"
    assert found["reasoning"] == "aiwfe.plugins.reasoning.plugin:ReasoningPlugin"


def test_bad_signatures_name_plugin_handler_and_signature() -> None:
    problems = validate_plugin_class(BadSignatures)
    text = "\n".join(problems)
    assert "plugin bad, handler not_async" in text and "not async" in text
    assert "handler two_args" in text and "exactly one message" in text
    assert "handler wrong_return" in text and "async def wrong_return(self, msg: Ping) -> R" in text


def test_every_problem_at_once() -> None:
    m = parse_manifest(
        f"""
        [pods.empty]
        plugins = []
        [pods.a]
        plugins = ["{HERE}:Server", "{HERE}:Twin", "{HERE}:Caller", "no-such-plugin"]
        [plugins."{HERE}:Server"]
        level = "high"
        [plugins.ghost]
        x = 1
        """,
        "m.toml",
        env={},
    )
    problems = [str(p) for p in check_manifests([m])]
    text = "\n".join(problems)
    assert "pod empty: has no plugins" in text
    assert "unknown plugin 'no-such-plugin'" in text and "installed:" in text
    assert "vt.ping is served twice" in text
    assert "calls vt.unserved (Unserved) but no pod serves it" in text
    assert f"[plugins.{HERE}:Server]" in text and "level" in text
    assert "[plugins.ghost]: configures a plugin no pod runs" in text
    assert all("hint:" in p for p in problems)


def test_valid_manifest_has_no_problems() -> None:
    m = parse_manifest(
        f"""
        [pods.a]
        plugins = ["{HERE}:Server"]
        [pods.b]
        plugins = ["{HERE}:Twin"]
        """,
        env={},
    )
    assert check_manifests([m]) == []


def _aiwfe(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_cli_check_shipped_manifests(repo_root: Path) -> None:
    r = _aiwfe("check", *sorted(str(p) for p in (repo_root / "manifests").glob("*.toml")), cwd=repo_root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok: 3 manifest(s)")


def test_cli_check_names_the_unserved_contract(tmp_path: Path, repo_root: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[pods.a]\nplugins = ["tests.support.probe:ProbePlugin"]\n')
    r = _aiwfe("check", str(bad), cwd=repo_root)
    assert r.returncode == 1
    assert "calls perception.perceive (Perceive) but no pod serves it" in r.stderr
    assert "calls reasoning.reason (Reason) but no pod serves it" in r.stderr


def test_handler_overrides_are_validated() -> None:
    m = parse_manifest(
        f"""
        [pods.a]
        plugins = ["{HERE}:Server"]
        [pods.a.handlers."vt.ping"]
        concurrency = "many"
        [pods.a.handlers."vt.nothing"]
        concurrency = 3
        """,
        env={},
    )
    text = "\n".join(str(p) for p in check_manifests([m]))
    assert "handlers.'vt.ping'" in text and "concurrency" in text
    assert "handlers.'vt.nothing'" in text and "no plugin in this pod serves it" in text


async def test_handler_overrides_apply() -> None:
    from aiwfe.bus.local import LocalBus
    from aiwfe.kernel.pod import PodRunner

    m = parse_manifest(
        f'[pods.a]\nplugins = ["{HERE}:Server"]\n[pods.a.handlers."vt.ping"]\nconcurrency = 3\nmax_queue = "7"\n', env={}
    )
    pod = PodRunner(m, "a", LocalBus("x"), ops_port=0)
    ep = pod.kernel.endpoints[Ping]
    assert (ep.limiter.limit, ep.limiter.max_queue) == (3, 7)
