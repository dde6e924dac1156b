"""Reasoning over a real NATS server, its provider a local OpenAI/Ollama-speaking server.

Partial output streams into the JetStream event stream of the job that called Reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from aiwfe.kernel import RemoteError
from aiwfe.kernel.manifest import parse_manifest
from aiwfe.kernel.pod import PodRunner
from aiwfe.plugins.reasoning.contract import Reason
from tests.support.llm_servers import FakeLLMServer, Fault
from tests.support.pods import running
from tests.unit.test_reasoning import Asked, AskJob

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("cleanup_streams")]


@contextlib.asynccontextmanager
async def pods(prefix: str, nats_url: str, **cfg: Any) -> AsyncIterator[dict[str, PodRunner]]:
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.items())
    text = (
        f'[system]\nsubject_prefix = "{prefix}"\ndrain_timeout_s = 2\n'
        '[pods.llm]\nplugins = ["reasoning", "tests.unit.test_reasoning:AskPlugin"]\n[pods.client]\nplugins = []\n'
        f"[plugins.reasoning]\n{body}\n"
    )
    m = parse_manifest(text, env={})
    async with running(m, nats_url=nats_url) as runners:
        yield runners


@pytest.mark.parametrize("provider", ["ollama", "openai"])
async def test_reason_over_nats_with_retries_and_streamed_job_events(prefix: str, nats_url: str, provider: str) -> None:
    async with FakeLLMServer(chunk_delay_s=0.005) as srv:
        cfg = {"provider": provider, "base_url": srv.url, "model": "m", "backoff_s": [0.01], "stream_interval_ms": 0}
        async with pods(prefix, nats_url, **cfg) as p:
            k = p["client"].kernel
            srv.plan(Fault(status=503))
            answers = await asyncio.gather(*(k.call(Reason(role=f"r{i}", task="t")) for i in range(8)))
            assert all(a.answer == "The answer is forty two." and a.confidence == 0.8 for a in answers)
            assert sorted(a.attempts for a in answers) == [1] * 7 + [2]
            srv.plan(Fault(status=401))
            with pytest.raises(RemoteError) as e:
                await k.call(Reason(role="r", task="t"))
            assert e.value.type == "ProviderError" and not e.value.retryable

            job_id = await k.submit(AskJob(task="fast query"))
            texts = []
            async with asyncio.timeout(15):
                async for ev in k.job_events(job_id):
                    if ev.type == "reasoning.answer_streamed":
                        texts.append(ev.data["text"])
                    if ev.type == "job.done":
                        break
            result = msgspec.msgpack.decode((await k.wait_job(job_id)).result, type=Asked)
            assert len(texts) > 2 and "".join(texts).startswith(result.answer)
