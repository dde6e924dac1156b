"""``aiwfe check`` proves a manifest whole: misspelled keys with a "did you mean", config
beyond types (:meth:`Plugin.validate_config`), config values naming contracts
(:attr:`Plugin.config_addresses`), and a starting pod refusing the same config with the
same messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import ConfigError, Job, Plugin, Reply, Request, serves
from aiwfe.kernel.config_check import config_problems, one_of
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.kernel.tools.check import check_manifests, load_for_check


class Done(Reply):
    ok: bool = True


class Work(Job[Done], tag="ck.work"):
    pass


class Ask(Request[Done], tag="ck.ask"):
    pass


class Worker(Plugin):
    name = "worker"

    @serves(Work)
    async def work(self, job: Work) -> Done:
        return Done()

    @serves(Ask)
    async def ask(self, req: Ask) -> Done:
        return Done()


class Router(Plugin):
    """Names contracts in its config, and has a closed set and a cross-field rule."""

    name = "router"
    config_addresses = {"jobs": "job", "fallback": "request", "any_of": ""}

    class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        jobs: dict[str, str] = {}
        fallback: str = ""
        any_of: list[str] = []
        mode: str = "fast"
        low: int = 0
        high: int = 10

    @classmethod
    def validate_config(cls, config: Config) -> list[str | tuple[str, str]]:
        problems = one_of("mode", config.mode, ("fast", "safe"))
        if config.low > config.high:
            problems.append(f"low: {config.low} is more than high ({config.high})")
        return problems


class Broken(Plugin):
    name = "broken"

    @classmethod
    def validate_config(cls, config: Any) -> list[str | tuple[str, str]]:
        raise RuntimeError("oops")


HERE = "tests.unit.test_check"


def _problems(text: str) -> list[str]:
    return [str(p) for p in check_manifests([parse_manifest(text, "m.toml", env={})])]


def test_config_values_naming_contracts_must_be_served_by_some_pod() -> None:
    text = "\n".join(
        _problems(
            f"""
            [pods.a]
            plugins = ["{HERE}:Router"]
            [pods.b]
            plugins = ["{HERE}:Worker"]
            [plugins."{HERE}:Router"]
            jobs = {{ w = "ck.work", typo = "ck.wrk", wrong_kind = "ck.ask" }}
            fallback = "ck.work"
            any_of = ["ck.ask", "ck.work", "nope.none"]
            """
        )
    )
    assert "jobs['typo']: 'ck.wrk' is no job contract served" in text and "did you mean 'ck.work'?" in text
    assert "jobs['wrong_kind']: 'ck.ask' is no job contract served" in text
    assert "fallback: 'ck.work' is no request contract served" in text
    assert "any_of: 'nope.none' is no contract served" in text
    assert "jobs['w']" not in text and "'ck.ask' is no contract" not in text


def test_all_served_is_valid() -> None:
    assert (
        _problems(
            f"""
            [pods.a]
            plugins = ["{HERE}:Router", "{HERE}:Worker"]
            [plugins."{HERE}:Router"]
            jobs = {{ w = "ck.work" }}
            fallback = "ck.ask"
            """
        )
        == []
    )


def test_job_limits_name_served_jobs_and_fields_of_their_contracts() -> None:
    text = "\n".join(
        _problems(
            f"""
            [system.jobs."ck.wrk"]
            max_per_owner = 2
            [system.jobs."ck.work"]
            caps = {{ n = 3 }}
            [pods.a]
            plugins = ["{HERE}:Worker"]
            """
        )
    )
    assert '[system.jobs."ck.wrk"]: no pod serves this job' in text and "did you mean 'ck.work'?" in text
    assert '[system.jobs."ck.work"]: caps name no field of Work: n' in text


def test_validate_config_closed_sets_and_cross_field_rules() -> None:
    problems = _problems(
        f"""
        [pods.a]
        plugins = ["{HERE}:Router", "{HERE}:Broken"]
        [plugins."{HERE}:Router"]
        mode = "fsat"
        low = 11
        """
    )
    text = "\n".join(problems)
    assert "mode: unknown value 'fsat'" in text and "did you mean 'fast'? available: fast, safe" in text
    assert "low: 11 is more than high (10)" in text and "hint: see Router.Config" in text
    assert "validate_config failed: RuntimeError('oops')" in text
    assert all("hint:" in p for p in problems)


def test_misspelled_keys_get_did_you_mean(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        f"""
        [sytem]
        name = "x"
        [system]
        drain_timeout = 3
        [pods.a]
        plugins = ["{HERE}:Router", "{HERE}:Worker", "helios"]
        replica = 2
        [pods.a.resources]
        cpu_requests = "1"
        [pods.a.handlers."ck.work"]
        max_deliverr = 3
        [pods.a.handlers."ck.wrok"]
        concurrency = 1
        [plugins."{HERE}:Router"]
        mdoe = "fast"
        [plugins.helios]
        experts = [{{ name = "a", role = "A", expertise = {{}}, wieght = 2.0 }}]
        fallback_experts = ["a"]
        [plugins.reasonning]
        provider = "ollama"
        """
    )
    m, problems = load_for_check(path)
    assert m is not None  # the misspellings are reported and the rest is still checked
    problems += check_manifests([m])
    text = "\n".join(map(str, problems))
    for where, near in [
        (f"{path}: unknown key 'sytem'", "'system'"),
        ("[system]: unknown key 'drain_timeout'", "'drain_timeout_s'"),
        ("[pods.a]: unknown key 'replica'", "'replicas'"),
        ("[pods.a.resources]: unknown key 'cpu_requests'", "'cpu_request'"),
        ("[pods.a.handlers.'ck.work']: unknown key 'max_deliverr'", "'max_deliver'"),
        ("[pods.a.handlers.'ck.wrok']: no plugin in this pod serves it", "'ck.work'"),
        (f"[plugins.{HERE}:Router]: unknown key 'mdoe'", "'mode'"),
        ("[plugins.helios]: unknown key 'wieght' in experts[0]", "'weight'"),
        ("[plugins.reasonning]: configures a plugin no pod runs", "did you mean"),
    ]:
        assert where in text, where
        assert f"did you mean {near}" in text or near in text
    assert all(p.hint for p in problems), [str(p) for p in problems if not p.hint]


def test_cli_lists_every_problem_and_exits_1(tmp_path: Path, repo_root: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        """
        [pods.api]
        plugins = ["gateway", "auth"]
        [pods.brain]
        plugins = ["reasoning", "perception", "memory", "learning"]
        [plugins.gateway]
        job_kinds = { helios = "helios.ask" }
        servr = "granian"
        [plugins.reasoning]
        provider = "gpt5"
        [plugins.memory]
        embedder = "olama"
        """
    )
    r = subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=60,
    )
    assert r.returncode == 1
    err = r.stderr
    assert "[plugins.reasoning]: provider: unknown value 'gpt5'" in err and "available: extractive, ollama, openai" in err
    assert "[plugins.gateway]: job_kinds['helios']: 'helios.ask' is no job contract served" in err
    assert "served job contracts: none" in err
    assert "[plugins.gateway]: unknown key 'servr'" in err and "did you mean 'server'?" in err
    assert "embedder: unknown value 'olama'" in err and "did you mean 'ollama'?" in err
    assert err.startswith("4 problem(s):")


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('[plugins.reasoning]\nprovider = "gpt5"\n', "provider: unknown value 'gpt5' (available: extractive, ollama, openai)"),
        ('[plugins.reasoning]\nprovder = "ollama"\n', "unknown key 'provder' (did you mean 'provider'?)"),
        ('[pods.a.handlers."reasoning.reason"]\nconcurency = 3\n', "unknown key 'concurency' (did you mean 'concurrency'?)"),
    ],
)
def test_a_starting_pod_refuses_what_check_refuses(config: str, expected: str) -> None:
    m = parse_manifest('[pods.a]\nplugins = ["reasoning"]\n' + config, "m.toml", env={})
    check = "\n".join(str(p) for p in check_manifests([m]))
    assert expected.split(" (")[0] in check and expected.split(" (")[1].rstrip(")") in check
    with pytest.raises(ConfigError) as e:
        PodRunner(m, "a", LocalBus("x"), ops_port=0)
    assert expected in e.value.message


def test_a_starting_pod_checks_config_addresses_against_the_manifest() -> None:
    m = parse_manifest(
        f'[pods.a]\nplugins = ["{HERE}:Router"]\n[pods.b]\nplugins = ["{HERE}:Worker"]\n'
        f'[plugins."{HERE}:Router"]\njobs = {{ x = "ck.wrk" }}\n',
        "m.toml",
        env={},
    )
    with pytest.raises(ConfigError, match=r"'ck.wrk' is no job contract served .*did you mean 'ck.work'"):
        PodRunner(m, "a", LocalBus("x"), ops_port=0)
    ok = msgspec.structs.replace(m, plugins={f"{HERE}:Router": {"jobs": {"x": "ck.work"}}})
    PodRunner(ok, "a", LocalBus("x"), ops_port=0)


def test_config_problems_returns_the_config_when_valid() -> None:
    cfg, problems = config_problems(Router, {"mode": "safe"}, served={})
    assert problems == [] and isinstance(cfg, Router.Config) and cfg.mode == "safe"
    cfg, problems = config_problems(Router, {"low": "many"}, served=None)
    assert cfg is None and "Expected `int`" in problems[0][0] and "Router.Config fields" in problems[0][1]


def test_aiwfe_run_names_every_misspelled_manifest_key() -> None:
    with pytest.raises(ConfigError) as e:
        parse_manifest('[pods.a]\nplugins = ["x"]\nreplica = 2\n[system]\ndrain_timeout = 1\n', "m.toml", env={})
    assert "unknown key 'replica' in pods.a (did you mean 'replicas'?)" in e.value.message
    assert "unknown key 'drain_timeout' in system (did you mean 'drain_timeout_s'?)" in e.value.message


@pytest.mark.parametrize(
    ("plugin", "config", "expected"),
    [
        ("reasoning", {"provider": "openai"}, "model: provider openai needs `model`"),
        ("memory", {"vector_store": "qdrant"}, "vector_store: unknown value 'qdrant'"),
        ("memory", {"embedder": "openai"}, "embed_model: embedder openai needs a model"),
        ("gateway", {"server": "gunicorn"}, "server: unknown value 'gunicorn'"),
        ("gateway", {"ws_calls": ["helios.ask"]}, "ws_calls: helios.ask not among the gateway's calls"),
        ("auth", {"jwt_algorithm": "RS256"}, "RS256 needs jwt_private_key or jwt_private_key_file"),
        ("auth", {"jwt_secret": "short"}, "jwt_secret: must be at least 32 bytes"),
        ("auth", {"pool_min": 5, "pool_max": 2}, "pool_min: 5 is more than pool_max (2)"),
        ("perception", {"mode": "magic"}, "mode: unknown value 'magic'"),
        ("helios", {"fallback_experts": ["nobody"]}, "fallback_experts: 'nobody' is not an expert"),
        ("learning", {"prior_mean": 2.0}, "prior_mean: must be from 0 to 1, not 2.0"),
    ],
)
def test_shipped_plugins_check_their_config(plugin: str, config: dict[str, Any], expected: str) -> None:
    from aiwfe.kernel.registry import resolve

    _cfg, problems = config_problems(resolve(plugin), config)
    assert any(expected in what for what, _hint in problems), problems
    assert all(hint for _what, hint in problems)
