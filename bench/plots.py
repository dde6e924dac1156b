"""``aiwfe bench plots``: PERFORMANCE.md's plots, drawn from the benchmarks' JSON lines.

Each benchmark prints one JSON object as its last line. This script sweeps the ones worth a
picture, keeps those lines in a JSON-lines file, and draws each sweep as an SVG line chart
(hand-written SVG: no plotting library to install, and text diffs in review):

* ``ws.svg`` -- ``aiwfe bench ws``: WebSocket round-trip p99 (and p50) against connections,
  through the gateway and for the bare echo baseline of the same run;
* ``helios.svg`` -- ``aiwfe bench helios``: job time against the number of experts when the
  lines vary it, else against the simulated latency per expert call: the parallel job beside
  the same expert calls made one after another (the old system's shape);
* ``jobs.svg`` -- ``aiwfe bench jobs``: durable jobs per second against jobs in flight,
  through the kernel and raw nats-py JetStream.

``aiwfe bench plots`` runs the sweeps at quick sizes (two minutes on two cores; ``--sizes
full`` for the sizes of PERFORMANCE.md's tables; ``--only ws,jobs`` for some), writes each
JSON line to ``--jsonl`` (default ``docs/perf/bench.jsonl``; a sweep replaces the lines of
the benchmarks it runs and keeps the others) and draws. ``--from FILE`` draws from a file of
JSON lines instead, running nothing. A line is either a benchmark's own
last line (which benchmark it is is told by its keys) or ``{"bench": NAME, "result": {...}}``
as the sweep writes them. Last line printed: ``{"plots": [files], "lines": N}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

__all__ = ["SWEEPS", "classify", "draw", "line_chart", "main", "read_lines"]

Row = dict[str, Any]
Series = dict[str, list[tuple[float, float]]]

#: the benchmark runs of a sweep, per size: (bench name, its arguments)
SWEEPS: dict[str, list[tuple[str, list[str]]]] = {
    "quick": [
        *[("ws", ["-n", str(n), "--duration", "5", "--clients", "1", "--warmup", "3"]) for n in (50, 200, 500)],
        *[("helios", ["--latency", str(s), "--concurrent", "10", "--concurrent-latency", "0.1"]) for s in (0.1, 0.3, 0.6)],
        *[("jobs", ["--jobs", "300", "--rounds", "1", "--inflight", str(n)]) for n in (1, 4, 16, 64)],
    ],
    "full": [
        *[("ws", ["-n", str(n), "--duration", "20"]) for n in (500, 1000, 2000, 5000)],
        *[("helios", ["--latency", str(s), "--concurrent", "50"]) for s in (0.5, 1.0, 2.0)],
        *[("jobs", ["--jobs", "2000", "--rounds", "3", "--inflight", str(n)]) for n in (1, 4, 16, 64, 256)],
    ],
}

# which benchmark a bare result line comes from: keys only it has
_SIGNATURES = {
    "ws": {"connections", "p99_ms", "echo_p99_ms"},
    "helios": {"experts", "job_s", "sequential_s"},
    "jobs": {"kernel_per_s", "raw_per_s", "inflight"},
}


def classify(obj: Row) -> tuple[str, Row] | None:
    """``(bench, result)`` of one JSON line, or None when it is no benchmark's we plot."""
    if isinstance(obj.get("bench"), str) and isinstance(obj.get("result"), dict):
        return obj["bench"], obj["result"]
    for name, keys in _SIGNATURES.items():
        if keys <= obj.keys():
            return name, obj
    return None


def read_lines(lines: Iterable[str]) -> dict[str, list[Row]]:
    """The results per benchmark in JSON lines (blank lines, non-JSON lines and lines of other
    benchmarks are skipped: a benchmark's log may be piped in whole)."""
    out: dict[str, list[Row]] = {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        found = classify(obj) if isinstance(obj, dict) else None
        if found is not None:
            out.setdefault(found[0], []).append(found[1])
    return out


def _series(rows: list[Row], x: str, ys: dict[str, str], scale: float = 1.0) -> Series:
    """One series per label in ``ys`` (label → key), points sorted by ``x``; rows lacking a
    number for either are left out (a failed run's null)."""
    out: Series = {}
    for label, key in ys.items():
        pts = [
            (float(r[x]), float(r[key]) * scale)
            for r in rows
            if isinstance(r.get(x), int | float) and isinstance(r.get(key), int | float)
        ]
        if pts:
            out[label] = sorted(pts)
    return out


def _ws(rows: list[Row]) -> tuple[str, str, str, str, Series, bool]:
    ys = {"gateway p99": "p99_ms", "gateway p50": "p50_ms", "bare echo p99": "echo_p99_ms"}
    title = "WebSocket round trip, 1 msg/s per connection"
    loads = sorted(float(r["load_avg_1m"]) for r in rows if isinstance(r.get("load_avg_1m"), int | float))
    cpus = next((r["cpus"] for r in rows if isinstance(r.get("cpus"), int)), None)
    if loads:  # the machine's state moves p99 more than anything: say it on the chart
        title += f"\nload average {loads[0]:g}–{loads[-1]:g} during the runs" + (f", {cpus} cores" if cpus else "")
    return "ws", title, "connections", "ms", _series(rows, "connections", ys), False


def _helios(rows: list[Row]) -> tuple[str, str, str, str, Series, bool]:
    ys = {"parallel job": "job_s", "same calls one after another": "sequential_s"}
    if len({r.get("experts") for r in rows}) > 1:
        return "helios", "helios job time", "experts", "s", _series(rows, "experts", ys), False
    n = rows[0].get("experts", "?") if rows else "?"
    title = f"helios job time, {n} experts"
    return "helios", title, "simulated latency per expert call (s)", "s", _series(rows, "latency_s", ys), False


def _jobs(rows: list[Row]) -> tuple[str, str, str, str, Series, bool]:
    ys = {"kernel": "kernel_per_s", "raw nats-py JetStream": "raw_per_s"}
    return "jobs", "durable jobs, closed loop", "jobs in flight", "jobs/s", _series(rows, "inflight", ys), True


_CHARTS: dict[str, Callable[[list[Row]], tuple[str, str, str, str, Series, bool]]] = {
    "ws": _ws,
    "helios": _helios,
    "jobs": _jobs,
}


def draw(results: dict[str, list[Row]], out_dir: Path) -> list[Path]:
    """Write one SVG per benchmark with results into ``out_dir``; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, chart in _CHARTS.items():
        rows = results.get(name)
        if not rows:
            continue
        stem, title, xlabel, ylabel, series, log_x = chart(rows)
        if not series:
            continue
        path = out_dir / f"{stem}.svg"
        path.write_text(line_chart(title, xlabel, ylabel, series, log_x=log_x))
        written.append(path)
    return written


# -- SVG -----------------------------------------------------------------------------------

_W, _H = 640, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 44, 48
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
_DASHES = ("", "6 3", "2 3", "8 3 2 3", "")


def _ticks(lo: float, hi: float, want: int = 5) -> list[float]:
    """Round tick values covering ``lo..hi`` (steps of 1, 2 or 5 × a power of ten)."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / want
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(math.ceil((hi - first) / step) + 1)]


def _fmt(v: float) -> str:
    if v >= 10_000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def line_chart(title: str, xlabel: str, ylabel: str, series: Series, *, log_x: bool = False) -> str:
    """An SVG line chart: one polyline with markers per series, axes from 0 (y) with round
    ticks, a grid and a legend. A second line of ``title`` is drawn smaller, as a note.
    ``log_x``: a base-2 logarithmic x axis (positive x only)."""
    title, _, note = title.partition("\n")
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    fx: Callable[[float], float] = (lambda v: math.log2(v)) if log_x else (lambda v: v)
    if log_x:
        xt = [2.0**e for e in range(math.floor(math.log2(min(xs))), math.ceil(math.log2(max(xs))) + 1)]
    else:
        xt = _ticks(min(0.0, min(xs)), max(xs))
    yt = _ticks(0.0, max(ys) * 1.05 if max(ys) > 0 else 1.0)
    x0, x1, y0, y1 = fx(xt[0]), fx(xt[-1]), yt[0], yt[-1]
    pw, ph = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(v: float) -> float:
        return round(_LEFT + (fx(v) - x0) / ((x1 - x0) or 1.0) * pw, 1)

    def py(v: float) -> float:
        return round(_TOP + ph - (v - y0) / ((y1 - y0) or 1.0) * ph, 1)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" '
        'font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
        f'<rect width="{_W}" height="{_H}" fill="white"/>',
        f'<text x="{_W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if note:
        out.append(f'<text x="{_W / 2}" y="34" text-anchor="middle" font-size="11" fill="#555">{escape(note)}</text>')
    for v in yt:
        out.append(f'<line x1="{_LEFT}" y1="{py(v)}" x2="{_W - _RIGHT}" y2="{py(v)}" stroke="#ddd"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{py(v) + 4}" text-anchor="end">{_fmt(v)}</text>')
    for v in xt:
        out.append(f'<line x1="{px(v)}" y1="{_TOP}" x2="{px(v)}" y2="{_TOP + ph}" stroke="#eee"/>')
        out.append(f'<text x="{px(v)}" y="{_TOP + ph + 16}" text-anchor="middle">{_fmt(v)}</text>')
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{_LEFT + pw / 2}" y="{_H - 10}" text-anchor="middle">{escape(xlabel)}</text>')
    mid = _TOP + ph / 2
    out.append(f'<text x="16" y="{mid}" text-anchor="middle" transform="rotate(-90 16 {mid})">{escape(ylabel)}</text>')
    for i, (label, pts) in enumerate(series.items()):
        colour, dash = _COLOURS[i % len(_COLOURS)], _DASHES[i % len(_DASHES)]
        points = " ".join(f"{px(x)},{py(y)}" for x, y in pts)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<g class="series"><title>{escape(label)}</title>')
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out += [
            f'<circle cx="{px(x)}" cy="{py(y)}" r="3" fill="{colour}"><title>{_fmt(x)}: {y:.4g}</title></circle>' for x, y in pts
        ]
        out.append("</g>")
        ly = _TOP + 14 + 16 * i
        key = f'x1="{_LEFT + 10}" y1="{ly - 4}" x2="{_LEFT + 34}" y2="{ly - 4}"'
        out.append(f'<line {key} stroke="{colour}" stroke-width="2"{dash_attr}/>')
        out.append(f'<text x="{_LEFT + 40}" y="{ly}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# -- running the sweeps --------------------------------------------------------------------


def _run_bench(name: str, args: Sequence[str], url: str | None) -> Row | None:
    """Run ``aiwfe bench NAME ARGS`` in a child process; its last JSON line, or None."""
    cmd = [sys.executable, "-m", "aiwfe.kernel.tools.cli", "bench", name, *args, *(["--url", url] if url else [])]
    print("plots: " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.strip().splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        print(f"plots: {name} failed (exit {r.returncode}): {r.stderr[-500:]}", file=sys.stderr)
        return None
    result: Row = json.loads(lines[-1])
    return result


def sweep(size: str, jsonl: Path, url: str | None, only: set[str]) -> None:
    """Run the ``size`` sweep of the benchmarks in ``only``; write their lines to ``jsonl``,
    keeping the lines it holds of the other benchmarks."""
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    for line in jsonl.read_text().splitlines() if jsonl.exists() else []:
        with contextlib.suppress(ValueError, TypeError):
            found = classify(json.loads(line))
            if found is not None and found[0] not in only:
                kept.append(line)
    with jsonl.open("w") as fh:
        fh.writelines(line + "\n" for line in kept)
        for name, args in SWEEPS[size]:
            if name not in only:
                continue
            result = _run_bench(name, args, url)
            if result is not None:
                fh.write(json.dumps({"bench": name, "args": list(args), "result": result}) + "\n")
                fh.flush()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``aiwfe bench plots``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="aiwfe bench plots", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--from", dest="source", metavar="FILE", help="draw from these JSON lines (- for stdin); run nothing")
    p.add_argument(
        "--jsonl", default="docs/perf/bench.jsonl", help="where a sweep keeps its lines (default docs/perf/bench.jsonl)"
    )
    p.add_argument("--out", default="docs/perf", help="directory of the SVG files (default docs/perf)")
    p.add_argument("--sizes", choices=sorted(SWEEPS), default="quick", help="sweep sizes (default quick)")
    p.add_argument("--only", default=",".join(_CHARTS), help="benchmarks to sweep, comma-separated (default all)")
    p.add_argument("--url", help="NATS URL for the benchmarks (default: each starts its private embedded nats-server)")
    a = p.parse_args(argv)
    if a.source is None:
        sweep(a.sizes, Path(a.jsonl), a.url, set(a.only.split(",")))
        source = Path(a.jsonl)
    else:
        source = Path(a.source)
    text = sys.stdin.read() if a.source == "-" else source.read_text()
    results = read_lines(text.splitlines())
    files = draw(results, Path(a.out))
    print(json.dumps({"plots": [str(f) for f in files], "lines": sum(len(v) for v in results.values())}), flush=True)
    return 0 if files else 1
