"""Real local HTTP servers speaking the Ollama and OpenAI APIs, for testing the clients.

:class:`FakeLLMServer` is a raw asyncio HTTP/1.1 server (one request per connection,
``Connection: close``) on 127.0.0.1 and a free port. It serves, in their documented wire
formats:

* Ollama ``POST /api/chat`` -- NDJSON stream of ``{"message": {"content"}, "done": false}``
  lines ending with ``{"done": true, "done_reason", "prompt_eval_count", "eval_count"}``;
  a single JSON object with ``"stream": false``; ``POST /api/embed`` → ``{"embeddings"}``.
* OpenAI ``POST /v1/chat/completions`` -- Server-Sent Events ``data: {chunk}`` with
  ``choices[0].delta.content``, a ``finish_reason`` chunk, a ``usage`` chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``; a plain
  ``chat.completion`` object with ``"stream": false``; ``POST /v1/embeddings`` → ``{"data"}``.

* Their model lists: Ollama ``GET /api/tags`` → ``{"models": [{"name", "model", ...}]}``,
  OpenAI ``GET /v1/models`` → ``{"object": "list", "data": [{"id", "object": "model", ...}]}``
  (what ``aiwfe up --llm`` probes).

``apis`` limits the server to one of the two (a real Ollama speaks both, with ``/v1``; vLLM or
llama.cpp's server speak only the OpenAI one): the other's paths answer 404.

Faults are planned per request, first in first out, with :meth:`FakeLLMServer.plan`:
an HTTP error status, a stall before the headers, a stall between chunks, a malformed
chunk, or a connection cut mid-stream. Every request is recorded in ``requests``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiwfe.plugins.memory.embed import HashingEmbedder

__all__ = ["FakeLLMServer", "Fault"]


@dataclass
class Fault:
    """What goes wrong with one request (all optional)."""

    status: int = 0
    stall_s: float = 0.0
    chunk_stall_s: float = 0.0
    malformed_after: int = -1
    cut_after: int = -1


@dataclass
class FakeLLMServer:
    """See the module docstring. ``answer`` builds the reply text from the last user message."""

    answer: Callable[[str], str] = lambda prompt: "The answer is forty two. Confidence: 0.8"
    chunk_delay_s: float = 0.0
    embed_dim: int = 384
    model: str = "fake-model"
    api_key: str = ""
    apis: tuple[str, ...] = ("ollama", "openai")
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    active: int = 0
    peak_active: int = 0
    _faults: list[Fault] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _conns: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def plan(self, *faults: Fault) -> None:
        """Queue faults for the next requests, one per request."""
        self._faults.extend(faults)

    async def __aenter__(self) -> FakeLLMServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        await self._server.wait_closed()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        payload = json.loads(body) if body else {}
        self.requests.append((path, payload))
        fault = self._faults.pop(0) if self._faults else Fault()
        if fault.stall_s:
            await asyncio.sleep(fault.stall_s)
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return await self._json(writer, 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
        if fault.status:
            return await self._json(writer, fault.status, {"error": f"planned failure {fault.status}"})
        if (path.startswith("/api/") and "ollama" not in self.apis) or (path.startswith("/v1/") and "openai" not in self.apis):
            return await self._json(writer, 404, {"error": "not found"})
        if method == "GET" and path == "/api/tags":
            details = {"format": "gguf", "family": "fake", "parameter_size": "1B", "quantization_level": "Q4_0"}
            tag = {"name": self.model, "model": self.model, "modified_at": "2026-01-01T00:00:00Z", "size": 1, "details": details}
            return await self._json(writer, 200, {"models": [tag]})
        if method == "GET" and path == "/v1/models":
            entry = {"id": self.model, "object": "model", "created": 1767225600, "owned_by": "fake"}
            return await self._json(writer, 200, {"object": "list", "data": [entry]})
        if method != "POST":
            return await self._json(writer, 405, {"error": "method not allowed"})
        if path == "/api/embed":
            return await self._json(writer, 200, {"model": self.model, "embeddings": self._embed(payload["input"])})
        if path == "/v1/embeddings":
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(self._embed(payload["input"]))]
            return await self._json(writer, 200, {"object": "list", "data": data, "model": self.model})
        if path == "/api/chat":
            return await self._ollama_chat(writer, payload, fault)
        if path == "/v1/chat/completions":
            return await self._openai_chat(writer, payload, fault)
        return await self._json(writer, 404, {"error": "not found"})

    def _embed(self, texts: str | list[str]) -> list[list[float]]:
        e = HashingEmbedder(self.embed_dim)
        return [e.embed_one(t) for t in ([texts] if isinstance(texts, str) else texts)]

    def _reply(self, payload: dict[str, Any]) -> tuple[list[str], int]:
        msgs = payload.get("messages", [])
        prompt = next((m["content"] for m in reversed(msgs) if m.get("role") == "user"), "")
        text = self.answer(prompt)
        words = text.split(" ")
        pieces = [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in msgs)
        return pieces, prompt_tokens

    async def _json(self, writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, content_type: str, chunks: list[bytes], fault: Fault) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        for i, chunk in enumerate(chunks):
            if i == fault.cut_after:
                return  # the connection drops mid-stream, no terminating chunk
            if i == fault.malformed_after:
                chunk = b'{"message": {"content": "broken' + b"\n" if content_type.endswith("ndjson") else b"data: {not json\n\n"
            if fault.chunk_stall_s and i > 0:
                await asyncio.sleep(fault.chunk_stall_s)
            elif self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _ollama_chat(self, writer: asyncio.StreamWriter, payload: dict[str, Any], fault: Fault) -> None:
        pieces, prompt_tokens = self._reply(payload)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        final = {
            "model": self.model,
            "created_at": created,
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "prompt_eval_count": prompt_tokens,
            "eval_count": len(pieces),
        }
        if payload.get("stream") is False:
            final["message"] = {"role": "assistant", "content": "".join(pieces)}
            return await self._json(writer, 200, final)
        lines = [
            json.dumps(
                {"model": self.model, "created_at": created, "message": {"role": "assistant", "content": p}, "done": False}
            ).encode()
            + b"\n"
            for p in pieces
        ]
        final["message"] = {"role": "assistant", "content": ""}
        lines.append(json.dumps(final).encode() + b"\n")
        await self._stream(writer, "application/x-ndjson", lines, fault)

    async def _openai_chat(self, writer: asyncio.StreamWriter, payload: dict[str, Any], fault: Fault) -> None:
        pieces, prompt_tokens = self._reply(payload)
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": self.model}
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces), "total_tokens": prompt_tokens + len(pieces)}
        if payload.get("stream") is not True:
            msg = {"role": "assistant", "content": "".join(pieces)}
            body = {**base, "object": "chat.completion", "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}
            return await self._json(writer, 200, {**body, "usage": usage})
        events = []
        chunk = {**base, "object": "chat.completion.chunk"}
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        events.append({**chunk, "choices": [first]})
        events += [{**chunk, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (payload.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        data = [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        await self._stream(writer, "text/event-stream", data, fault)
