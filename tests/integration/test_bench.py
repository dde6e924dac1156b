"""Benchmarks cannot rot: every ``aiwfe bench NAME`` and ``aiwfe loadtest SCENARIO`` runs at a
smoke size against this test's servers, and its last line is one JSON object with the keys its
docstring promises. No timing or ratio is checked here (figures live in PERFORMANCE.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]

BENCHES = {
    "rpc": (
        ["--seconds", "0.3", "--rounds", "1", "--inflight", "16", "--no-faststream"],
        ["raw_rps", "kernel_rps", "rps_ratio", "raw_p50_us", "kernel_p50_us", "p50_ratio", "local_call_us", "await_us"],
    ),
    "memory": (
        ["--memories", "50", "--inflight", "1", "--queries", "20", "--no-client-local"],
        ["memories", "ingest_per_s", "recall_p50_ms", "baseline_p50_ms", "overhead_pct", "local_overhead_pct", "inflight"],
    ),
    "helios": (
        ["--latency", "0.05", "--concurrent", "5", "--concurrent-latency", "0.05"],
        ["experts", "job_s", "sequential_s", "first_event_ms", "cached_ms", "concurrent_completed", "concurrent_p95_s",
         "processes", "concurrent_cpu_ms_per_job", "concurrent_nats_cpu_ms_per_job"],
    ),
    "ws": (
        ["-n", "20", "--duration", "1", "--clients", "1", "--warmup", "0"],
        ["connections", "connected_pct", "p50_ms", "p99_ms", "echo_p99_ms", "p99_ratio", "reply_errors", "niceness",
         "relay_p99_ms", "relay_reply_errors", "cpu_ratio_to_relay"],
    ),
    "auth-burst": (
        ["--connects", "20", "--logins", "4", "--users", "2", "--window", "0.5", "--clients", "1", "--replicas", "1",
         "--kdf-time-cost", "1", "--kdf-memory-kib", "8192"],
        ["connects", "logins", "failures", "p99_connect_ms", "redis_down_failures", "pool_max_in_use", "echo_p99_connect_ms",
         "p99_ratio", "cpu_us_per_connect", "floor_p99_connect_ms", "floor_failures", "floor_cpu_us_per_connect"],
    ),
    "jobs": (
        ["--jobs", "50", "--rounds", "1", "--inflight", "8"],
        ["jobs", "kernel_per_s", "raw_per_s", "ratio", "p50_ms", "p99_ms", "auth_ratio"],
    ),
    "embed": (
        ["--sentences", "16", "--batch", "8", "--rounds", "1"],
        ["pairs", "semantic_available", "model", "hashing_hit_at_5", "semantic_hit_at_5", "hashing_per_s", "semantic_per_s",
         "semantic_one_p50_ms"],
    ),
    "fairshare": (
        ["--jobs", "3", "--flooders", "1", "--flood-latency", "2", "--accounts", "2", "--without-fairness"],
        ["jobs", "limit", "unloaded_p50_ms", "loaded_p50_ms", "ratio", "other_failed", "flood_accepted", "flood_refused",
         "accounts", "loaded_max_ms", "unfair_ratio", "unfair_loaded_max_ms"],
    ),
    "startup": (
        ["--runs", "1", "--no-up"],
        ["pods", "max_pod_ready_s", "up_ready_s", "pod_goal_s", "ok"],
    ),
}  # fmt: skip

# `normal` is tests/integration/test_loadtest.py (which also checks the integrity figures).
SCENARIOS = {
    "peak": ["--users", "4", "--requests", "2", "--websockets", "4", "--duration", "2", "--ws-users", "2", "--ws-clients", "1",
             "--clients", "1"],
    "stress": ["--users", "4", "--requests", "2", "--duration", "0", "--clients", "1", "--max-duration", "20"],
    "websocket": ["--websockets", "4", "--duration", "2", "--ws-users", "2", "--ws-clients", "1"],
}  # fmt: skip
SCENARIO_KEYS = ["scenario", "requests", "p95_ms", "error_pct", "meets_target"]


def _last_json(cmd: list[str], env: dict[str, str], timeout_s: float) -> dict[str, object]:
    argv = [sys.executable, "-m", "aiwfe.kernel.tools.cli", *cmd]
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines, r.stderr[-3000:]
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    return result


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(BENCHES))
def test_benchmark_smoke(name: str, nats_url: str, database_url: str, redis_url: str) -> None:
    args, keys = BENCHES[name]
    env = dict(os.environ, NATS_URL=nats_url, DATABASE_URL=database_url, REDIS_URL=redis_url)
    extra = ["--url", nats_url] + (["--database-url", database_url] if name == "memory" else [])
    result = _last_json(["bench", name, *args, *extra], env, 170)
    assert [k for k in keys if k not in result] == []
    if name == "auth-burst":  # a burst of 20 has nothing to fail on, through the gateway or the floor server
        assert result["failures"] == result["floor_failures"] == result["echo_failures"] == 0, result
    if name == "helios":  # every job of the concurrent phase done, on the replicas the bench started
        assert result["concurrent_completed"] == 5 and result["processes"] == min(2, os.cpu_count() or 1), result
    if name == "ws":  # every frame answered, through the gateway and through the relay
        assert result["reply_errors"] == result["relay_reply_errors"] == 0, result


@pytest.mark.timeout(150)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_loadtest_smoke(scenario: str, nats_url: str, pg_url: str, redis_url: str) -> None:
    env = dict(os.environ, NATS_URL=nats_url, DATABASE_URL=pg_url, REDIS_URL=redis_url)
    result = _last_json(["loadtest", scenario, *SCENARIOS[scenario], "--settle", "60"], env, 140)
    assert [k for k in SCENARIO_KEYS if k not in result] == []
    assert result["scenario"] == scenario
    assert result["error_pct"] == 0, result
