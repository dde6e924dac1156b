"""``aiwfe bench plots`` draws valid SVG files from the benchmarks' JSON lines (a small
fixture: wrapped and bare result lines, a log line, a failed run, another benchmark's line)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from aiwfe.bench.plots import classify, draw, line_chart, main, read_lines

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "data" / "bench_sample.jsonl"
SVG = "{http://www.w3.org/2000/svg}"


def _series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """The polylines of an SVG chart by their series' title (parsing fails on invalid XML)."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg" and root.get("viewBox")
    out = {}
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        line = g.find(f"{SVG}polyline")
        assert title is not None and line is not None
        pts = [tuple(float(v) for v in p.split(",")) for p in (line.get("points") or "").split()]
        out[title.text or ""] = pts
    return out  # type: ignore[return-value]


def test_plots_from_a_jsonl_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--from", str(FIXTURE), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["helios.svg", "jobs.svg", "ws.svg"]
    ws = _series(tmp_path / "ws.svg")
    assert list(ws) == ["gateway p99", "gateway p50", "bare echo p99"]
    assert all(len(pts) == 3 for pts in ws.values())  # two wrapped lines and one bare line
    gw = ws["gateway p99"]
    assert gw == sorted(gw) and gw[0][1] > gw[-1][1]  # x grows, and a larger p99 is drawn higher (smaller y)
    helios = _series(tmp_path / "helios.svg")
    assert [len(v) for v in helios.values()] == [3, 3]
    assert "12 experts" in (ET.parse(tmp_path / "helios.svg").getroot().findtext(f"{SVG}title") or "")
    jobs = _series(tmp_path / "jobs.svg")
    assert [len(v) for v in jobs.values()] == [4, 4]  # the failed run (nulls) is left out
    xs = [x for x, _ in jobs["kernel"]]
    assert xs[1] - xs[0] == xs[3] - xs[2]  # a log2 axis: 1, 4, 16, 64 evenly spaced
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == {"plots": [str(tmp_path / n) for n in ("ws.svg", "helios.svg", "jobs.svg")], "lines": 11}


def test_helios_lines_varying_the_experts_plot_against_them(tmp_path: Path) -> None:
    lines = [json.dumps({"experts": n, "latency_s": 0.5, "job_s": 0.5 + n / 100, "sequential_s": n * 0.5}) for n in (2, 6, 12)]
    results = read_lines(lines)

    (path,) = draw(results, tmp_path)
    text = path.read_text()
    assert ">experts</text>" in text and "latency per expert" not in text
    assert [len(v) for v in _series(path).values()] == [3, 3]


def test_classify_and_escaping() -> None:
    assert classify({"raw_rps": 1}) is None
    assert classify({"bench": "jobs", "result": {"inflight": 1}}) == ("jobs", {"inflight": 1})
    svg = line_chart("a < b & c", "x", "y", {"s <1>": [(1.0, 0.0), (2.0, 0.0)]})
    ET.fromstring(svg)  # valid XML although every y is 0 and the labels need escaping


def test_registered_as_a_bench_command(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", "bench", "plots", "--from", str(FIXTURE), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["lines"] == 11


def test_a_sweep_of_one_benchmark_keeps_the_others_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aiwfe.bench.plots as plots

    jsonl = tmp_path / "bench.jsonl"
    jsonl.write_text(FIXTURE.read_text())
    ran: list[tuple[str, list[str]]] = []

    def fake_run(name: str, args: list[str], url: str | None) -> dict[str, object]:  # the benchmark's last line
        ran.append((name, list(args)))
        return {"jobs": 1, "kernel_per_s": 10, "raw_per_s": 12, "inflight": int(args[args.index("--inflight") + 1])}

    monkeypatch.setattr(plots, "_run_bench", fake_run)
    plots.sweep("quick", jsonl, None, {"jobs"})
    assert [n for n, _ in ran] == ["jobs"] * 4
    results = read_lines(jsonl.read_text().splitlines())
    assert {k: len(v) for k, v in results.items()} == {"ws": 3, "helios": 3, "jobs": 4}
    assert {r["kernel_per_s"] for r in results["jobs"]} == {10}
