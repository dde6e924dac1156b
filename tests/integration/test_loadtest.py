"""``aiwfe loadtest normal`` at a tiny scale against a real system (``aiwfe up`` of the
consolidated layout on this test's NATS, PostgreSQL schema and Redis): the JSON line has the
issue's keys, nothing failed and the integrity check saw every job. No timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_normal_scenario_tiny(nats_url: str, pg_url: str, redis_url: str) -> None:
    env = dict(os.environ, NATS_URL=nats_url, DATABASE_URL=pg_url, REDIS_URL=redis_url)
    cmd = ["loadtest", "normal", "--users", "5", "--requests", "2", "--duration", "2", "--settle", "60"]
    r = subprocess.run(
        [sys.executable, "-m", "aiwfe.kernel.tools.cli", *cmd],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=140,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("scenario", "requests", "p95_ms", "error_pct", "p50_ms", "integrity_pct", "target_p95_ms", "meets_target"):
        assert key in result, key
    assert result["scenario"] == "normal"
    assert result["requests"] == 10
    assert result["error_pct"] == 0, result
    assert result["jobs_accepted"] == 5
    assert result["integrity_pct"] == 100.0, result
    assert result["rows_checked"] is True
