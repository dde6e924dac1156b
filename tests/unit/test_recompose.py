"""``aiwfe recompose OLD NEW``: which pods to keep, start (those gaining a plugin first) and
drain; what is not a re-composition; the NATS users of the transition."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.tools import natsauth, recompose
from aiwfe.kernel.tools.cli import main

OLD = """
[system]
subject_prefix = "rc"
[pods.front]
plugins = ["perception"]
[pods.brain]
plugins = ["reasoning", "learning"]
"""
NEW = """
[system]
subject_prefix = "rc"
[pods.front]
plugins = ["perception"]
[pods.brain]
plugins = ["learning"]
[pods.llm]
plugins = ["reasoning"]
"""


def test_plan_keeps_unchanged_pods_starts_new_and_changed_ones_then_drains_the_old() -> None:
    old, new = parse_manifest(OLD, env={}), parse_manifest(NEW, env={})
    p = recompose.plan(old, new)
    assert p == recompose.Plan(keep=["front"], start=["llm", "brain"], drain=["brain"])
    assert p.changed == ["brain"]  # same name, new definition: a new instance, then the old one drains


def test_a_changed_plugin_config_or_system_setting_changes_the_pod() -> None:
    old = parse_manifest(OLD, env={})
    tuned = parse_manifest(OLD + '[plugins.perception]\nembedder = "hashing"\n', env={})
    assert recompose.plan(old, tuned).start == ["front"]
    slower = parse_manifest(OLD.replace('subject_prefix = "rc"', 'subject_prefix = "rc"\ndrain_timeout_s = 20'), env={})
    assert recompose.plan(old, slower).keep == []


def test_another_prefix_or_a_dropped_plugin_is_not_a_recomposition() -> None:
    old = parse_manifest(OLD, env={})
    other = parse_manifest(NEW.replace('"rc"', '"other"').replace('plugins = ["learning"]', 'plugins = ["perception"]'), env={})
    with pytest.raises(ConfigError) as e:
        recompose.plan(old, other)
    assert "another system" in str(e.value) and "learning" in str(e.value)


def test_the_transition_has_both_manifests_users_with_the_union_of_their_permissions() -> None:
    old, new = parse_manifest(OLD, env={}), parse_manifest(NEW, env={})
    perms = recompose.transition_permissions(old, new)
    assert set(perms) == set(natsauth.permissions(old)) | set(natsauth.permissions(new))
    brain_old, brain_new = natsauth.permissions(old)["pod-brain"], natsauth.permissions(new)["pod-brain"]
    assert set(perms["pod-brain"].subscribe) == set(brain_old.subscribe) | set(brain_new.subscribe)
    assert "rc.reasoning.reason" in perms["pod-brain"].subscribe  # the old brain still serves it while it drains


def test_cli_prints_the_steps_or_the_nats_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "old.toml").write_text(OLD)
    (tmp_path / "new.toml").write_text(NEW)
    old, new = str(tmp_path / "old.toml"), str(tmp_path / "new.toml")
    assert main(["recompose", old, new]) == 0
    out = capsys.readouterr().out
    assert "start 2 pod(s), then drain 1; keep 1" in out
    assert out.index(f"aiwfe run -m {new} --pod llm") < out.index("kill -TERM <pid of")
    assert "kubectl rollout status deployment/llm" in out
    assert main(["recompose", old, new, "--nats-config", str(tmp_path / "pw.json")]) == 0
    conf = capsys.readouterr().out
    assert conf.startswith("authorization: ") and '"pod-llm"' in conf and '"pod-brain"' in conf
    assert (tmp_path / "pw.json").stat().st_mode & 0o777 == 0o600
    assert main(["recompose", old, str(tmp_path / "nope.toml")]) == 2
