"""A real LLM where one is configured: ``aiwfe up --llm URL [--model M]`` points reasoning,
and so helios's experts, at an Ollama or OpenAI-compatible server.

The servers are local ones speaking the documented wire formats, streaming included
(:mod:`tests.support.llm_servers`): Ollama's NDJSON ``/api/chat`` and OpenAI's Server-Sent
Events ``/v1/chat/completions``. The end-to-end tests run ``aiwfe up`` as a user does (the
shipped monolith manifest, NATS, PostgreSQL and Redis from the environment), log in over
HTTP, submit a helios job and read its events over Server-Sent Events: each expert's streamed
text is the server's, the synthesis is built from it, and the server saw every expert's
request, streamed, with the chosen model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import load_manifest, parse_manifest
from aiwfe.kernel.tools.embedded import free_port
from aiwfe.kernel.tools.llm import LlmTarget, check_manifest_takes, resolve_llm
from tests.support.llm_servers import FakeLLMServer

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
AIWFE = [sys.executable, "-m", "aiwfe.kernel.tools.cli"]
CHAT = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}


def marker_answer(api: str) -> str:
    """The fake server's deterministic answer (its last line is the confidence reasoning parses)."""
    return f"The {api} server says caches need an expiry. Its second sentence names {api} again.\nConfidence: 0.9"


# -- which API a URL speaks --------------------------------------------------------------------


async def resolve(url: str, model: str = "", api_key: str = "") -> LlmTarget:
    return await asyncio.to_thread(resolve_llm, url, model, api_key=api_key, timeout_s=2.0)


async def test_a_bare_url_is_probed_and_the_first_listed_model_taken() -> None:
    async with FakeLLMServer(model="llama-fake:latest") as both, FakeLLMServer(model="qwen-fake", apis=("openai",)) as oai:
        t = await resolve(both.url)  # a real Ollama speaks both: /api/tags answers first
        assert (t.provider, t.base_url, t.model) == ("ollama", both.url, "llama-fake:latest")
        assert [p for p, _ in both.requests] == ["/api/tags"]
        t = await resolve(oai.url + "/")  # vLLM-like: /api/tags is 404, /v1/models answers
        assert (t.provider, t.base_url, t.model) == ("openai", oai.url, "qwen-fake")
        assert [p for p, _ in oai.requests] == ["/api/tags", "/v1/models"]


async def test_the_url_can_name_the_api() -> None:
    async with FakeLLMServer(model="m1") as srv:
        t = await resolve(srv.url + "/v1", "chosen")  # API and model known: the server is not asked
        assert (t.provider, t.base_url, t.model) == ("openai", srv.url, "chosen") and srv.requests == []
        t = await resolve(srv.url + "/v1")  # the model from /v1/models
        assert (t.provider, t.model) == ("openai", "m1") and [p for p, _ in srv.requests] == ["/v1/models"]
        t = await resolve("ollama+" + srv.url, "x")
        assert (t.provider, t.base_url, t.model) == ("ollama", srv.url, "x")
        t = await resolve("openai+" + srv.url, "x")
        assert (t.provider, t.base_url) == ("openai", srv.url)


async def test_an_api_key_goes_with_the_openai_probe() -> None:
    async with FakeLLMServer(model="k", api_key="sekret", apis=("openai",)) as srv:
        assert (await resolve(srv.url + "/v1", api_key="sekret")).model == "k"
        with pytest.raises(ConfigError, match="HTTP 401"):
            await resolve(srv.url + "/v1", api_key="wrong")


async def test_a_server_speaking_neither_api_is_refused_with_a_hint() -> None:
    port = free_port()
    with pytest.raises(ConfigError, match=r"neither Ollama nor .*/api/tags.*/v1/models.*ollama\+http"):
        await resolve(f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="not an http"):
        await resolve("nats://127.0.0.1:4222")
    with pytest.raises(ConfigError) as e:  # credentials in the URL stay out of the message
        await resolve(f"http://user:hunter2@127.0.0.1:{port}/v1")
    assert "hunter2" not in str(e.value) and "user:***@127.0.0.1" in str(e.value)


# -- aiwfe up --llm, end to end ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def aiwfe_up(args: list[str], env: dict[str, str], lines: list[str]) -> AsyncIterator[str]:
    """Run ``aiwfe up ARGS``; yield the gateway's URL once it listens; Ctrl-C it after."""
    proc = await asyncio.create_subprocess_exec(
        *AIWFE, "up", *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    assert proc.stdout is not None
    try:
        url = None
        async with asyncio.timeout(90):
            while url is None:
                raw = await proc.stdout.readline()
                if not raw:
                    break
                lines.append(raw.decode(errors="replace"))
                if m := re.search(r"gateway (?:listening )?at (http://\S+)", lines[-1]):
                    url = m.group(1)
        assert url is not None, "".join(lines[-40:])
        pump = asyncio.create_task(_pump(proc.stdout, lines))
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
    await pump


async def _pump(stream: asyncio.StreamReader, lines: list[str]) -> None:
    async for raw in stream:
        lines.append(raw.decode(errors="replace"))


async def helios_job(url: str, text: str) -> list[dict[str, Any]]:
    """Register, log in, submit a helios job over HTTP; return its events (Server-Sent Events)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        creds = {"username": "llm-user", "password": "a long enough password"}
        for _ in range(120):  # with a pod per plugin the gateway may listen before auth's pod is ready: 503
            r = await http.post("/v1/auth/register", json=creds)
            if r.status_code != 503:
                break
            await asyncio.sleep(0.25)
        assert r.status_code == 201, r.text
        r = await http.post("/v1/auth/login", json=creds)
        http.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        job = {"text": text, "max_experts": 3, "use_cache": False, "deadline_s": 60}
        r = await http.post("/v1/jobs", json={"kind": "helios", "input": job})
        assert r.status_code == 202, r.text
        events = []
        async with http.stream("GET", f"/v1/jobs/{r.json()['job_id']}/events") as sse:
            async for line in sse.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if "status" in events[-1]:
                        break
        return events


@pytest.mark.slow
@pytest.mark.timeout(180)
# the microservices manifest: reasoning in a pod of its own, streaming into helios's job from there
@pytest.mark.parametrize(("api", "manifest"), [("ollama", "monolith"), ("openai", "monolith"), ("openai", "microservices")])
async def test_aiwfe_up_llm_runs_helios_through_the_server(
    api: str, manifest: str, prefix: str, nats_url: str, pg_url: str, redis_url: str, cleanup_streams: None, tmp_path: Path
) -> None:
    model = f"{api}-fake-model"
    async with FakeLLMServer(answer=lambda prompt: marker_answer(api), model=model, chunk_delay_s=0.02) as srv:
        # ollama: a bare URL, probed, model from /api/tags; openai: the /v1 path and --model
        args = [srv.url] if api == "ollama" else [srv.url + "/v1", "--model", model]
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("AIWFE_", "OLLAMA_", "OPENAI_"))},
            "NATS_URL": nats_url,
            "DATABASE_URL": pg_url,
            "REDIS_URL": redis_url,
            "AIWFE_PREFIX": prefix,
            "AIWFE_GATEWAY_PORT": "0",
            "AIWFE_DATA_DIR": str(tmp_path / "data"),
            "AIWFE_EMBEDDER": "hashing",
        }
        lines: list[str] = []
        up_args = ["-m", f"manifests/{manifest}.toml", "--data-dir", str(tmp_path / "data"), "--llm", *args]
        async with aiwfe_up(up_args, env, lines) as url:
            events = await helios_job(url, "How should our service cache database answers?")
        log = "".join(lines)
        assert f"LLM: {api} at {srv.url}, model {model}" in log, log[-3000:]

    by_type: dict[str, list[dict[str, Any]]] = {}
    for ev in events:
        by_type.setdefault(ev["event"], []).append(ev["data"])
    assert events[-1]["status"] == "done", events[-1]
    experts = by_type["helios.selected"][0]["experts"]
    assert len(experts) >= 2, experts
    # each expert's answer streamed, in more than one piece, and the pieces are the server's text
    streamed: dict[str, list[str]] = {}
    for piece in by_type["reasoning.answer_streamed"]:
        assert piece["attempt"] == 1, piece
        streamed.setdefault(piece["label"], []).append(piece["text"])
    assert set(streamed) == set(experts), (streamed, experts)
    for label, pieces in streamed.items():
        assert "".join(pieces) == marker_answer(api), (label, pieces)
        assert len([p for p in pieces if p]) >= 2, (label, pieces)
    answered = {a["expert"]: a for a in by_type["helios.expert_answered"]}
    assert set(answered) == set(experts)
    for a in answered.values():
        assert a["answer"] == marker_answer(api).rsplit("\n", 1)[0] and a["confidence"] == 0.9, a
    # the synthesis is built from the server's sentences
    result = events[-1]["data"]  # job.done carries the Synthesis
    assert f"The {api} server says caches need an expiry." in result["answer"], result
    assert " ".join(d["text"] for d in by_type["helios.synthesis_delta"]) == result["answer"]  # one delta a sentence
    assert result["confidence"] == 0.9
    assert all(e["status"] == "answered" and e["tokens"] > 0 for e in result["experts"]), result  # the server's usage
    # the server saw one streamed chat request per expert, with the chosen model and the expert's role
    chats = [body for path, body in srv.requests if path == CHAT[api]]
    assert len(chats) == len(experts), srv.requests
    assert all(body["model"] == model and body["stream"] is True for body in chats)
    roles = sorted(next(m["content"] for m in body["messages"] if m["role"] == "system") for body in chats)
    assert all("expert" in r for r in roles) and len(set(roles)) == len(experts), roles
    assert all("How should our service cache database answers?" in body["messages"][-1]["content"] for body in chats)


@pytest.mark.timeout(60)
def test_up_refuses_model_without_llm_and_a_dead_llm(tmp_path: Path) -> None:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIWFE_")}
    base = [*AIWFE, "up", "-m", "manifests/monolith.toml", "--data-dir", str(tmp_path)]
    r = subprocess.run([*base, "--model", "m"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--model needs --llm" in r.stderr, r.stderr
    r = subprocess.run(
        [*base, "--llm", f"http://127.0.0.1:{free_port()}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "speaks neither Ollama nor" in r.stderr, r.stderr


def test_a_manifest_that_ignores_the_llm_variables_is_an_error() -> None:

    target = LlmTarget("ollama", "http://127.0.0.1:11434", "m", "test")
    fixed = parse_manifest('[pods.p]\nplugins = ["reasoning"]\n[plugins.reasoning]\nprovider = "extractive"\n', env={})
    with pytest.raises(ConfigError, match=r"AIWFE_LLM_PROVIDER"):
        check_manifest_takes(fixed, target)
    without = parse_manifest('[pods.p]\nplugins = ["perception"]\n', env={})
    with pytest.raises(ConfigError, match=r"no pod .* runs the reasoning plugin"):
        check_manifest_takes(without, target)
    for name in ("monolith", "consolidated", "microservices"):  # the shipped manifests take them
        check_manifest_takes(load_manifest(ROOT / "manifests" / f"{name}.toml", env=target.env()), target)
