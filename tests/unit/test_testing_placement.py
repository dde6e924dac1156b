"""aiwfe.testing's placements, manifests and the aiwfe_placements marker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiwfe.kernel.manifest import parse_manifest
from aiwfe.testing import Placement, SystemSpec, build_manifest, partition
from aiwfe.testing.pods import dump_toml

PLUGINS = ["auth", "memory", "perception", "reasoning", "learning", "helios", "gateway"]


def test_placements_parse() -> None:
    assert Placement.parse("monolith") == Placement("monolith") and Placement.parse("monolith").in_process
    assert Placement.parse("random:42") == Placement("random", 42) and str(Placement("random", 42)) == "random:42"
    assert not Placement.parse("per_plugin").in_process
    for bad in ("everywhere", "monolith:3", "random:x"):
        with pytest.raises(ValueError, match="placement"):
            Placement.parse(bad)


@pytest.mark.parametrize("seed", range(20))
def test_a_random_partition_is_seeded_complete_and_ordered(seed: int) -> None:
    pods = partition(PLUGINS, seed)
    assert pods == partition(PLUGINS, seed)
    assert 2 <= len(pods) <= len(PLUGINS) and all(pods.values())
    assert sorted(p for ps in pods.values() for p in ps) == sorted(PLUGINS)
    for ps in pods.values():
        assert ps == sorted(ps, key=PLUGINS.index)  # start order kept: the gateway opens last in its pod


def test_random_partitions_differ_between_seeds() -> None:
    assert len({tuple(map(tuple, partition(PLUGINS, s).values())) for s in range(10)}) > 5


def test_per_plugin_names_pods_after_plugins() -> None:
    spec = SystemSpec(plugins=["memory", "tests.fakes:FakeLLM", "other.fakes:FakeLLM"])
    assert Placement("per_plugin").pods(spec) == {
        "memory": ["memory"],
        "fakellm": ["tests.fakes:FakeLLM"],
        "fakellm-2": ["other.fakes:FakeLLM"],
    }


def test_a_spec_from_a_shipped_manifest_runs_under_every_placement(repo_root: Path) -> None:
    spec = SystemSpec.from_manifest(repo_root / "manifests" / "consolidated.toml")
    assert sorted(spec.plugins) == sorted(PLUGINS)
    env = {"AIWFE_PREFIX": "x"}
    for placement in ("monolith", "per_plugin", "random:5", "manifest"):
        data = build_manifest(spec, Placement.parse(placement), "tprefix", gateway_port=12345)
        m = parse_manifest(dump_toml(data), env=env)
        assert m.system.subject_prefix == "tprefix"
        placed = [p for pod in m.pods.values() for p in pod.plugins]
        assert (set(placed) if placement == "manifest" else sorted(placed)) == (  # helios: two pods in the manifest
            set(PLUGINS) if placement == "manifest" else sorted(PLUGINS)
        )
        assert int(m.plugins["gateway"]["port"]) == 8080  # the manifest's ${AIWFE_GATEWAY_PORT:-8080} (the runner sets it)
    assert list(build_manifest(spec, Placement("manifest"), "p")["pods"]) == list(spec.pods or {})


def test_the_gateway_gets_a_port_of_its_own() -> None:
    data = build_manifest(SystemSpec(plugins=["gateway"], config={"gateway": {"port": 0}}), Placement("monolith"), "p", 23456)
    assert data["plugins"]["gateway"] == {"port": 23456, "host": "127.0.0.1"}


MARKED = """
import pytest
from aiwfe.testing import PlacementMismatch

@pytest.mark.aiwfe_placements("monolith", "random", plugins=["perception"])
async def test_agree(aiwfe_system):
    aiwfe_system.record("plugins", sorted(p for pod in aiwfe_system.manifest.pods.values() for p in pod.plugins))

@pytest.mark.aiwfe_placements("monolith", "random:1", plugins=["perception", "reasoning"])
async def test_differ(aiwfe_system):
    aiwfe_system.record("pods", len(aiwfe_system.pods))

@pytest.mark.aiwfe_placements(plugins=["perception"])
def test_default_placements(aiwfe_placement):
    pass

TOML = '''
[system]
call_timeout_s = 7
[pods.front]
plugins = ["perception"]
[pods.back]
plugins = ["reasoning"]
[plugins.reasoning]
latency_s = 0.0
'''

@pytest.mark.aiwfe_placements("monolith", manifest=TOML)
async def test_from_a_manifest(aiwfe_system):
    assert list(aiwfe_system.pods) == ["monolith"]
    assert aiwfe_system.manifest.pods["monolith"].plugins == ["perception", "reasoning"]
    assert aiwfe_system.manifest.system.call_timeout_s == 7
"""


@pytest.mark.timeout(120)
def test_the_marker_runs_a_body_under_each_placement_and_compares(tmp_path: Path) -> None:
    (tmp_path / "test_marked.py").write_text(textwrap.dedent(MARKED))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--aiwfe-seeds=3,4", "-W", "error"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=110,
    )
    out = r.stdout
    passing = ("test_agree[monolith]", "test_agree[random:3]", "test_agree[random:4]", "test_differ[monolith]")
    for passed in (*passing, "test_from_a_manifest[monolith]"):
        assert f"{passed} PASSED" in out, out
    assert "test_differ[random:1] FAILED" in out and "PlacementMismatch: 'pods' differs between placements" in out, out
    for placement in ("monolith", "per_plugin", "random:3", "random:4"):
        assert f"test_default_placements[{placement}] PASSED" in out, out
