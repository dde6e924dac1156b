from __future__ import annotations

from pathlib import Path

import pytest

from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import interpolate, load_manifest, parse_manifest

M = """
[system]
subject_prefix = "${PREFIX:-aiwfe}"

[pods.api]
plugins = ["perception"]
ops_port = "${OPS:-9100}"
replicas = 2

[pods.api.autoscaling]
max_replicas = 4

[plugins.perception]
expertise = { x = ["${WORD:-alpha}", "beta"] }
"""


def test_defaults_and_conversion() -> None:
    m = parse_manifest(M, env={})
    assert m.system.subject_prefix == "aiwfe"
    pod = m.pod("api")
    assert pod.ops_port == 9100 and pod.replicas == 2
    assert pod.autoscaling is not None and pod.autoscaling.max_replicas == 4
    assert m.plugins["perception"]["expertise"]["x"] == ["alpha", "beta"]


def test_environment_wins() -> None:
    m = parse_manifest(M, env={"PREFIX": "p1", "OPS": "9200", "WORD": "gamma"})
    assert m.system.subject_prefix == "p1"
    assert m.pod("api").ops_port == 9200
    assert m.plugins["perception"]["expertise"]["x"][0] == "gamma"


def test_unset_variable_without_default_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\$\{NEEDED\} is not set"):
        interpolate({"a": "${NEEDED}"}, {})


def test_unknown_field_is_rejected() -> None:
    with pytest.raises(ConfigError, match="replica"):
        parse_manifest('[pods.a]\nplugins = ["x"]\nreplica = 2\n', env={})


def test_bad_toml_names_the_file() -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        parse_manifest("[pods.a\n", "broken.toml", env={})


def test_unknown_pod_lists_pods() -> None:
    m = parse_manifest(M, env={})
    with pytest.raises(ConfigError, match="pods: api"):
        m.pod("nope")


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="cannot read manifest"):
        load_manifest("/nonexistent/m.toml")


@pytest.mark.parametrize("name", ["monolith", "consolidated", "microservices"])
def test_shipped_manifests_load(name: str, repo_root: Path) -> None:
    m = load_manifest(repo_root / "manifests" / f"{name}.toml", env={})
    assert m.pods
    everything = {p for pod in m.pods.values() for p in pod.plugins}
    assert {"perception", "reasoning"} <= everything


def test_gc_thresholds_are_three_positive_integers_or_empty() -> None:
    base = '[pods.api]\nplugins = ["perception"]\n[system]\n'
    assert parse_manifest(base, env={}).system.gc_thresholds == (50_000, 20, 100)
    assert parse_manifest(base + "gc_thresholds = []", env={}).system.gc_thresholds == ()
    for bad in ("[1, 2]", "[0, 10, 10]", "[700, 10, 10, 10]"):
        with pytest.raises(ConfigError, match="gc_thresholds"):
            parse_manifest(base + f"gc_thresholds = {bad}", env={})
