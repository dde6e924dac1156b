"""The reasoning plugin on LocalBus, its providers against local servers speaking the
Ollama (/api/chat, NDJSON) and OpenAI (/v1/chat/completions, Server-Sent Events) APIs:
streaming, 5xx, timeouts, malformed chunks and cut connections, retries, the concurrency
limit and its gauge, and partial output streamed as job events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from aiwfe.bus.local import LocalBus
from aiwfe.kernel import ConfigError, Job, Plugin, RemoteError, Reply, serves
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.reasoning.contract import Reason, Reasoned
from aiwfe.plugins.reasoning.plugin import ACTIVE_LLM_REQUESTS, ReasoningPlugin, extract, parse_confidence
from tests.support.llm_servers import FakeLLMServer, Fault


class Asked(Reply):  # type: ignore[misc]  # msgspec frozen Structs, see pyproject
    answer: str
    attempts: int


class AskJob(Job[Asked], tag="rtest.ask"):  # type: ignore[misc]
    task: str


class AskPlugin(Plugin):
    """A job that calls Reason in-process, as helios does."""

    name = "rtest"
    calls = (Reason,)

    @serves(AskJob, max_deliver=1)
    async def ask(self, job: AskJob) -> Asked:
        r = await self.kernel.call(Reason(role="dba", task=job.task, context=["Use an index."], stream=True, label="expert-7"))
        return Asked(answer=r.answer, attempts=r.attempts)


Start = Callable[..., contextlib.AbstractAsyncContextManager[PodRunner]]


@pytest.fixture
def start(prefix: str) -> Start:
    @contextlib.asynccontextmanager
    async def run(**cfg: Any) -> AsyncIterator[PodRunner]:
        body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
        text = (
            f'[system]\nsubject_prefix = "{prefix}"\ndrain_timeout_s = 2\n'
            '[pods.p]\nplugins = ["reasoning", "tests.unit.test_reasoning:AskPlugin"]\n'
            f"[plugins.reasoning]\n{body}\n"
        )
        async with PodRunner(parse_manifest(text, env={}), "p", LocalBus(prefix), ops_port=0) as pod:
            yield pod

    return run


def fast(url: str, provider: str, **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "base_url": url, "model": "fake-model", "backoff_s": [0.01], "read_timeout_s": 2.0, **extra}


REASON = Reason(role="dba", task="How do I make the query fast?", context=["An index makes a query fast.", "Cats purr."])


async def test_extractive_stays_backward_compatible(start: Start) -> None:
    async with start() as pod:
        r = await pod.kernel.call(REASON)
        assert (r.answer, r.confidence) == extract(REASON.role, REASON.task, REASON.context, 3)
        assert r.provider == "extractive" and r.prompt_tokens > 0 and r.completion_tokens > 0
        assert (r.model, r.finish_reason, r.attempts) == ("", "", 1)
        old = msgspec.msgpack.encode({"type": "reasoning.reason", "role": "r", "task": "t"})
        assert msgspec.msgpack.decode(old, type=Reason).options == {}
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await pod.kernel.call(Reason(role="r", task="t", latency_s=0.2))
        assert loop.time() - t0 >= 0.2


def test_parse_confidence() -> None:
    assert parse_confidence("Use an index.\nConfidence: 0.85", 0.5) == ("Use an index.", 0.85)
    assert parse_confidence("Use an index. (confidence: 80%)", 0.5) == ("Use an index.", 0.8)
    assert parse_confidence("Use an index.", 0.5) == ("Use an index.", 0.5)
    assert parse_confidence("x Confidence = 7", 0.5) == ("x", 0.07)


def test_unknown_provider_and_missing_model() -> None:
    with pytest.raises(ConfigError, match="available: extractive, ollama, openai"):
        ReasoningPlugin(ReasoningPlugin.Config(provider="magic"), object())
    with pytest.raises(ConfigError, match="needs `model`"):
        ReasoningPlugin(ReasoningPlugin.Config(provider="ollama"), object())


@pytest.mark.parametrize("provider", ["ollama", "openai"])
async def test_provider_streams_an_answer(start: Start, provider: str) -> None:
    async with FakeLLMServer(api_key="sk-test") as srv, start(**fast(srv.url, provider, api_key="sk-test")) as pod:
        r = await pod.kernel.call(Reason(role="dba", task="Why?", context=["ctx one"], options={"temperature": 0.0, "seed": 7}))
        assert r.answer == "The answer is forty two." and r.confidence == 0.8
        assert (r.provider, r.model, r.finish_reason, r.attempts) == (provider, "fake-model", "stop", 1)
        assert r.completion_tokens == 7 and r.prompt_tokens > 0 and r.latency_ms > 0
        path, body = srv.requests[-1]
        assert body["stream"] is True and body["messages"][0]["role"] == "system"
        assert "dba" in body["messages"][0]["content"] and "1. ctx one" in body["messages"][1]["content"]
        if provider == "ollama":
            assert path == "/api/chat" and body["options"] == {"temperature": 0.0, "num_predict": 512, "seed": 7}
        else:
            assert path == "/v1/chat/completions" and body["stream_options"] == {"include_usage": True}
            assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 512, 7)
        plugin = pod.plugins["reasoning"]
        assert isinstance(plugin, ReasoningPlugin)
        pieces = [p async for p in plugin.stream(Reason(role="dba", task="Why?"))]
        assert "".join(p for p in pieces if isinstance(p, str)) == "The answer is forty two. Confidence: 0.8"
        assert isinstance(pieces[-1], Reasoned) and len(pieces) == 8


@pytest.mark.parametrize("provider", ["ollama", "openai"])
@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500),
        Fault(status=503),
        Fault(status=429),
        Fault(stall_s=5),
        Fault(chunk_stall_s=5),
        Fault(malformed_after=2),
        Fault(cut_after=3),
    ],
    ids=["500", "503", "429", "stall", "chunk-stall", "malformed", "cut"],
)
async def test_retryable_faults_are_retried(start: Start, provider: str, fault: Fault) -> None:
    async with FakeLLMServer() as srv, start(**fast(srv.url, provider, read_timeout_s=0.3)) as pod:
        srv.plan(fault)
        r = await pod.kernel.call(REASON)
        assert r.attempts == 2 and r.answer == "The answer is forty two."
        assert len(srv.requests) == 2


@pytest.mark.parametrize("provider", ["ollama", "openai"])
async def test_errors_after_retries_and_client_errors_at_once(start: Start, provider: str) -> None:
    async with FakeLLMServer() as srv, start(**fast(srv.url, provider, max_attempts=3)) as pod:
        srv.plan(Fault(status=502), Fault(status=502), Fault(status=502))
        with pytest.raises(RemoteError) as e:
            await pod.kernel.call(REASON)
        assert e.value.type == "ProviderError" and e.value.retryable and "HTTP 502" in e.value.message
        assert len(srv.requests) == 3
        srv.plan(Fault(status=400))
        with pytest.raises(RemoteError) as e:
            await pod.kernel.call(REASON)
        assert not e.value.retryable and len(srv.requests) == 4
    async with start(**fast("http://127.0.0.1:9", provider, max_attempts=2)) as pod:
        with pytest.raises(RemoteError) as e:
            await pod.kernel.call(REASON)
        assert e.value.retryable and "connection failed" in e.value.message


async def test_concurrency_limit_per_provider_and_gauge(start: Start) -> None:
    async with FakeLLMServer(chunk_delay_s=0.02) as srv, start(**fast(srv.url, "ollama", max_concurrency=2)) as pod:
        gauge = ACTIVE_LLM_REQUESTS.labels("ollama")
        seen: list[float] = []

        async def watch() -> None:
            while True:
                seen.append(gauge._value.get())
                await asyncio.sleep(0.005)

        w = asyncio.create_task(watch())
        results = await asyncio.gather(*(pod.kernel.call(REASON) for _ in range(6)))
        w.cancel()
        assert all(r.answer for r in results)
        assert srv.peak_active == 2 and max(seen) == 2 and gauge._value.get() == 0


@pytest.mark.parametrize("provider", ["extractive", "ollama"])
async def test_partial_output_streams_as_job_events(start: Start, provider: str) -> None:
    async with FakeLLMServer(chunk_delay_s=0.01) as srv:
        cfg = fast(srv.url, provider, stream_interval_ms=0) if provider != "extractive" else {}
        async with start(**cfg) as pod:
            srv.plan(Fault(cut_after=3))
            job_id = await pod.kernel.submit(AskJob(task="fast query"))
            events: list[Any] = []
            async with asyncio.timeout(10):
                async for ev in pod.kernel.job_events(job_id):
                    events.append(ev)
                    if ev.type in ("job.done", "job.failed"):
                        break
            streamed = [e.data for e in events if e.type == "reasoning.answer_streamed"]
            final = msgspec.msgpack.decode((await pod.kernel.wait_job(job_id)).result, type=Asked)
            last = [s for s in streamed if s["attempt"] == final.attempts]
            assert [s["index"] for s in last] == list(range(len(last))) and last[-1]["done"]
            assert "".join(s["text"] for s in last).startswith(final.answer)
            assert all(s["role"] == "dba" and s["label"] == "expert-7" for s in streamed)
            if provider == "ollama":
                assert final.attempts == 2 and any(s["attempt"] == 1 for s in streamed)
