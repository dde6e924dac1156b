"""Memory pieces without a database: fusion, the hashing embedder, the HTTP embedders
against local servers speaking the Ollama and OpenAI embedding APIs, contracts."""

from __future__ import annotations

import math

import msgspec
import pytest

from aiwfe.plugins.memory.contract import MemoryHit, Recall, RecallResult
from aiwfe.plugins.memory.embed import EmbedError, HashingEmbedder, make_embedder
from aiwfe.plugins.memory.plugin import fuse
from tests.support.llm_servers import FakeLLMServer, Fault


def test_fuse_is_reciprocal_rank_fusion() -> None:
    fused = fuse({"a": 1, "b": 2}, {"b": 1, "c": 2}, 60)
    assert [pid for pid, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[1][1] == pytest.approx(1 / 61) and fused[2][1] == pytest.approx(1 / 62)
    assert fuse({}, {}, 60) == []
    assert [p for p, _ in fuse({"y": 1}, {"x": 1}, 60)] == ["x", "y"]  # ties broken by id


def test_hashing_embedder_is_deterministic_and_unit_length() -> None:
    e = HashingEmbedder(64)
    v = e.embed_one("PostgreSQL makes queries fast")
    assert v == HashingEmbedder(64).embed_one("PostgreSQL makes queries fast")
    assert len(v) == 64 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9)
    near = e.embed_one("fast PostgreSQL queries")
    far = e.embed_one("cats sleep all day")
    cos = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert cos(v, near) > cos(v, far)
    assert e.embed_one("") == [0.0] * 64


@pytest.mark.parametrize("api", ["ollama", "openai"])
async def test_http_embedders_speak_the_apis(api: str) -> None:
    async with FakeLLMServer(embed_dim=32, api_key="k") as srv:
        emb = make_embedder(api, dim=32, base_url=srv.url, model="m", api_key="k", timeout_s=2)
        try:
            vs = await emb.embed(["one text", "another text"])
            want = [HashingEmbedder(32).embed_one(t) for t in ["one text", "another text"]]
            assert [[round(x, 9) for x in v] for v in vs] == [[round(x, 9) for x in v] for v in want]
            path, body = srv.requests[-1]
            assert path == ("/api/embed" if api == "ollama" else "/v1/embeddings")
            assert body == {"model": "m", "input": ["one text", "another text"]}
            srv.plan(Fault(status=503))
            with pytest.raises(EmbedError) as e:
                await emb.embed(["x"])
            assert e.value.retryable
            srv.plan(Fault(status=400))
            with pytest.raises(EmbedError) as e:
                await emb.embed(["x"])
            assert not e.value.retryable
            srv.plan(Fault(stall_s=5))
            with pytest.raises(EmbedError) as e:
                await make_embedder(api, dim=32, base_url=srv.url, model="m", api_key="k", timeout_s=0.2).embed(["x"])
            assert e.value.retryable
            wrong = make_embedder(api, dim=16, base_url=srv.url, model="m", api_key="k")
            with pytest.raises(EmbedError, match="vectors of 16"):
                await wrong.embed(["x"])
            await wrong.aclose()
        finally:
            await emb.aclose()


def test_unknown_embedder() -> None:
    with pytest.raises(ValueError, match="available: hashing"):
        make_embedder("magic", dim=8)
    with pytest.raises(ValueError, match="needs a model"):
        make_embedder("ollama", dim=8)


def test_contracts_round_trip() -> None:
    r = Recall(query="q", owner="o", filters={"topic": "db", "n": 3})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=Recall) == r
    res = RecallResult(hits=[MemoryHit(id="1", text="t", score=0.1, found_by=["text"], metadata={"a": [1, 2]})])
    assert msgspec.json.decode(msgspec.json.encode(res), type=RecallResult) == res
