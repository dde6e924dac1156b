"""Pods' CPU requests as CPU weights on one machine (kernel/tools/cpu_share.py), and their
validation in `aiwfe check`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from aiwfe.kernel import ConfigError
from aiwfe.kernel.manifest import load_manifest, parse_manifest
from aiwfe.kernel.tools.check import check_manifests
from aiwfe.kernel.tools.cpu_share import MAX_NICE, cpu_millicores, lower_priority, pod_niceness, resource_problems

ROOT = Path(__file__).resolve().parents[2]


def _manifest(**requests: str) -> str:
    return "".join(
        f'[pods.{pod}]\nplugins = ["perception"]\nresources = {{ cpu_request = "{r}", cpu_limit = "{r}" }}\n'
        for pod, r in requests.items()
    )


@pytest.mark.parametrize(
    ("text", "milli"), [("500m", 500), ("1", 1000), ("1.5", 1500), ("0.25", 250), ("2", 2000), ("1m", 1), ("2000m", 2000)]
)
def test_kubernetes_cpu_quantities_in_millicores(text: str, milli: int) -> None:
    assert cpu_millicores(text) == milli


@pytest.mark.parametrize(
    "text", ["", " 2 ", "0", "0m", "0.0", "abc", "1.2345", "-1", "1e3", "500M", "1 cpu", "5000000000m", "1.5m", "2\n"]
)
def test_anything_else_is_refused_with_the_forms_it_takes(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        cpu_millicores(text)


def test_the_largest_request_runs_at_nice_0_and_half_of_it_3_steps_above() -> None:
    # CFS weights: nice 0 = 1024, nice 3 = 526 (≈ 512 = 500m/1000m as the kubelet's shares)
    assert pod_niceness(parse_manifest(_manifest(big="1", half="500m", quarter="250m", same="1000m"))) == {
        "big": 0,
        "half": 3,
        "quarter": 6,
        "same": 0,
    }
    assert pod_niceness(parse_manifest(_manifest(huge="100", tiny="1m")))["tiny"] == MAX_NICE
    assert pod_niceness(parse_manifest(_manifest(only="250m"))) == {"only": 0}
    shipped = pod_niceness(load_manifest(ROOT / "manifests" / "consolidated.toml"))
    assert shipped == {"unified-api-gateway": 3, "cognitive-processing-engine": 0, "background-worker-engine": 3}
    assert set(pod_niceness(load_manifest(ROOT / "manifests" / "microservices.toml")).values()) == {0}


def test_bad_quantities_and_a_request_over_its_limit_are_named_by_check_and_refused_by_up() -> None:
    text = (
        _manifest(ok="500m", bad="lots")
        + '[pods.over]\nplugins = ["perception"]\nresources = { cpu_request = "2", cpu_limit = "1500m" }\n'
        + '[pods.nolimit]\nplugins = ["perception"]\nresources = { cpu_limit = "0m" }\n'
    )
    m = parse_manifest(text, source="m.toml")
    assert [(w, what.split(":")[0]) for w, what, _hint in resource_problems(m)] == [
        ("[pods.bad.resources]", "cpu_request"),
        ("[pods.bad.resources]", "cpu_limit"),
        ("[pods.over.resources]", "cpu_request 2 is above cpu_limit 1500m"),
        ("[pods.nolimit.resources]", "cpu_limit"),
    ]
    found = [str(p) for p in check_manifests([m])]
    assert any("m.toml: [pods.bad.resources]: cpu_request: 'lots' is not a CPU quantity" in p for p in found), found
    assert any("above cpu_limit 1500m" in p and "lower the request" in p for p in found), found
    with pytest.raises(ConfigError, match=r"m\.toml: \[pods\.bad\.resources\] cpu_request: 'lots'"):
        pod_niceness(m)
    assert check_manifests([load_manifest(ROOT / "manifests" / "consolidated.toml")]) == []


def test_the_child_starts_at_the_raised_niceness_and_its_threads_inherit_it() -> None:
    assert lower_priority(0) is None
    code = (
        "import os, threading; t = []; th = threading.Thread(target=lambda: t.append(os.nice(0)));"
        "th.start(); th.join(); print(os.nice(0), t[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], preexec_fn=lower_priority(3), capture_output=True, text=True, check=True)
    base = os.nice(0)
    assert out.stdout.split() == [str(min(MAX_NICE, base + 3))] * 2
