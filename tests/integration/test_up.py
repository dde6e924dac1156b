"""The README's bring-up command: `aiwfe up` with nothing configured starts embedded
services and every pod, answers, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from aiwfe.bench._paraphrases import DISTRACTORS, PAIRS, shared_words
from aiwfe.kernel.tools.embedded import free_port, wait_port
from aiwfe.plugins.memory.semantic import SemanticEmbedder, SemanticUnavailable
from tests.support.servers import nats_hello

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
AIWFE = [sys.executable, "-m", "aiwfe.kernel.tools.cli"]

try:
    SemanticEmbedder()
    SEMANTIC_MISSING = ""
except SemanticUnavailable as e:
    SEMANTIC_MISSING = str(e)


def manifest_plugins(manifest: str) -> set[str]:
    import tomllib

    pods = tomllib.loads((ROOT / "manifests" / f"{manifest}.toml").read_text())["pods"]
    return {p for pod in pods.values() for p in pod["plugins"]}


def _http(method: str, url: str, body: dict[str, Any], token: str = "") -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _paraphrase_recalled(gateway: str) -> bool:
    """Through the gateway of the running system: remember a memory among distractors, then
    recall it with a paraphrase that shares no word with it (what hashing misses)."""
    memory, query = PAIRS[0]
    assert not shared_words(memory, query)
    user = {"username": f"para{os.getpid()}", "password": "correct horse battery"}
    _http("POST", f"{gateway}/v1/auth/register", user)
    token = _http("POST", f"{gateway}/v1/auth/login", user)["access_token"]
    for text in [*DISTRACTORS[:8], memory]:
        _http("POST", f"{gateway}/v1/memory", {"text": text}, token)
    hits = _http("POST", f"{gateway}/v1/memory/recall", {"query": query, "k": 5}, token)
    texts = [h["text"] for h in hits["hits"]]
    assert memory in texts, texts
    return True


@pytest.mark.timeout(180)
@pytest.mark.parametrize("manifest", ["monolith", "microservices"])
def test_up_starts_everything_and_stops_on_ctrl_c(manifest: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "REDIS_URL", "QDRANT_URL")}
    env["AIWFE_PREFIX"] = "up" + str(os.getpid())
    env["AIWFE_GATEWAY_PORT"] = "0"  # any free port: CI machines may have 8080 taken
    proc = subprocess.Popen(
        [*AIWFE, "up", "-m", f"manifests/{manifest}.toml", "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    nats_url = None
    ready: set[str] = set()
    import tomllib

    pods = set(tomllib.loads((ROOT / "manifests" / f"{manifest}.toml").read_text())["pods"])
    end = time.monotonic() + 120
    try:
        while ready != pods and time.monotonic() < end:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"embedded NATS at (nats://\S+)", line):
                nats_url = m.group(1)
            if m := re.search(r"pod (\S+) ready", line):
                ready.add(m.group(1).rstrip(";"))
        assert ready == pods, "".join(lines[-40:])
        assert nats_url is not None and not nats_url.endswith(":4222")
        # what it started, with the operator's credentials, for the shell tools (mode 0600)
        system = tmp_path / "data" / "system.json"
        assert system.stat().st_mode & 0o777 == 0o600
        info = json.loads(system.read_text())
        assert (info["nats_url"], info["nats_user"], info["prefix"]) == (nats_url, "admin", env["AIWFE_PREFIX"])
        assert info["publisher"]["nats_user"] == "publisher" and info["database_url"] and info["redis_url"]
        assert info["gateway_url"] is None or info["gateway_url"].startswith("http://127.0.0.1:")
        # its NATS refuses anonymous and wrong-credential clients
        host, port = nats_url.removeprefix("nats://").split(":")
        assert asyncio.run(nats_hello(host, int(port), None, None)) == "-ERR 'Authorization Violation'"
        assert asyncio.run(nats_hello(host, int(port), "admin", "wrong")) == "-ERR 'Authorization Violation'"
        assert asyncio.run(nats_hello(host, int(port), "admin", info["nats_password"])) == "PONG"
        r = subprocess.run(  # no --url, no --prefix: system.json says
            [*AIWFE, "publish", "--data-dir", str(tmp_path / "data"),
             f"{env['AIWFE_PREFIX']}.perception.perceive", '{"text": "Deploy to Kubernetes"}'],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["expertise"][0]["tag"] == "devops"
        # the `publisher` user (submit and status only, no JetStream API) submits a job with it too
        pub = info["publisher"]
        pub_url = f"nats://{pub['nats_user']}:{quote(pub['nats_password'], safe='')}@{nats_url.removeprefix('nats://')}"
        r = subprocess.run(
            [*AIWFE, "publish", "--url", pub_url, "--prefix", env["AIWFE_PREFIX"], "--wait", "--timeout", "60",
             f"{env['AIWFE_PREFIX']}.submit.helios.ask", '{"text": "How do I index a database?", "max_experts": 2}'],
            cwd=ROOT, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["status"] == "done", r.stdout
        r = subprocess.run(  # the server's URL without credentials: refused, one line
            [*AIWFE, "publish", "--url", nats_url, f"{env['AIWFE_PREFIX']}.perception.perceive", "{}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "refused the connection: Authorization Violation" in r.stderr, r.stderr
        assert nats_url in r.stderr, r.stderr
        if "gateway" in manifest_plugins(manifest) and not SEMANTIC_MISSING:
            # the semantic embedder by default (`embedder = auto`); the gateway's port (0: any) is
            # written to system.json once it listens
            for _ in range(100):
                if gateway := json.loads(system.read_text())["gateway_url"]:
                    break
                time.sleep(0.1)
            assert gateway, "system.json never named the gateway"
            assert _paraphrase_recalled(gateway)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    assert proc.returncode == 0, "".join(lines[-20:]) + rest
    host, port = nats_url.removeprefix("nats://").split(":")
    assert not wait_port(host, int(port), 0.5), "embedded NATS still running after Ctrl-C"


def test_shell_tools_name_an_unreachable_server_in_one_line(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    for argv in (["publish", "--url", url, "aiwfe.jobs.x", "{}"], ["dlq", "list", "--url", url]):
        r = subprocess.run([*AIWFE, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == f"error: cannot reach NATS at {url} (from --url); is `aiwfe up` running? Start it, or pass --url\n"
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "AIWFE_DATA_DIR")}
    r = subprocess.run([*AIWFE, "dlq", "list"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "start `aiwfe up`" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def _nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the children's niceness from /proc")
def test_up_runs_each_pod_at_the_cpu_weight_of_its_request(tmp_path: Path, nats_url: str) -> None:
    """A pod requesting a quarter of the largest request runs 6 nice steps above it (CFS
    weight ≈ 1/4), every thread of it; the largest request at the supervisor's own niceness."""
    manifest = tmp_path / "m.toml"
    manifest.write_text(
        f'[system]\nsubject_prefix = "upnice{os.getpid()}"\n'
        '[pods.heavy]\nplugins = ["perception"]\nresources = { cpu_request = "1" }\n'
        '[pods.light]\nplugins = ["perception"]\nresources = { cpu_request = "250m" }\n'
    )
    env = {**os.environ, "NATS_URL": nats_url}
    proc = subprocess.Popen(
        [*AIWFE, "up", "-m", str(manifest), "--data-dir", str(tmp_path / "data")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not {"heavy", "light"} <= {m.group(1).rstrip(";") for line in lines if (m := re.search(r"pod (\S+) ready", line))}:
            line = proc.stdout.readline()
            assert line, "".join(lines[-40:])
            lines.append(line)
        pods: dict[str, int] = {}
        for status in Path("/proc").glob("[0-9]*/stat"):
            try:
                pid = int(status.parent.name)
                ppid = int(status.read_text().rsplit(")", 1)[1].split()[1])
                args = (status.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if ppid == proc.pid and b"--pod" in args:
                pods[args[args.index(b"--pod") + 1].decode()] = pid
        assert set(pods) == {"heavy", "light"}, pods
        base = _nice_of(proc.pid)
        assert _nice_of(pods["heavy"]) == base
        assert _nice_of(pods["light"]) == min(19, base + 6)
        threads = list(Path(f"/proc/{pods['light']}/task").iterdir())
        assert {_nice_of(int(t.name)) for t in threads} == {min(19, base + 6)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
