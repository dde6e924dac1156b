"""HTTP clients of the LLM providers: Ollama and OpenAI-compatible chat APIs, streamed.

* :class:`OllamaProvider` -- ``POST {base_url}/api/chat`` with ``"stream": true``; the
  reply is NDJSON, one ``{"message": {"content"}, "done": false}`` per line, ending with a
  ``"done": true`` line that carries ``done_reason``, ``prompt_eval_count`` and ``eval_count``.
* :class:`OpenAIProvider` -- ``POST {base_url}/v1/chat/completions`` with ``"stream": true``
  and ``stream_options.include_usage``; the reply is Server-Sent Events, ``data: {chunk}``
  with ``choices[0].delta.content``, then a ``usage`` chunk, then ``data: [DONE]``.

Both raise :class:`ProviderError`: ``retryable`` for 5xx, 429, timeouts, refused or cut
connections, malformed chunks and streams that end early; not retryable for other 4xx.
``read_timeout_s`` bounds the wait for each chunk, not the whole answer (the caller's
deadline does that).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["ChatResult", "OllamaProvider", "OpenAIProvider", "ProviderError"]

OnDelta = Callable[[str], Awaitable[None]]


class ProviderError(Exception):
    """A provider call failed; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class ChatResult:
    """The whole answer of one chat call."""

    text: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""


class _HttpProvider:
    name = ""

    def __init__(
        self, base_url: str, model: str, *, api_key: str = "", connect_timeout_s: float = 5.0, read_timeout_s: float = 60.0
    ) -> None:
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=connect_timeout_s)
        self._client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()

    async def _lines(self, path: str, body: dict[str, Any], handle: Callable[[str], Awaitable[bool]]) -> None:
        """POST ``body`` and feed each line of the streamed reply to ``handle`` until it returns True.

        Raises:
            ProviderError: see the module docstring.
        """
        try:
            async with self._client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    detail = (await r.aread())[:300].decode(errors="replace")
                    retryable = r.status_code >= 500 or r.status_code in (408, 429)
                    raise ProviderError(f"{self.name}: HTTP {r.status_code}: {detail}", retryable=retryable)
                async for line in r.aiter_lines():
                    if line.strip() and await handle(line):
                        return
        except httpx.TimeoutException as e:
            raise ProviderError(f"{self.name}: timed out ({type(e).__name__})", retryable=True) from None
        except httpx.TransportError as e:
            raise ProviderError(f"{self.name}: connection failed: {e!r}", retryable=True) from None
        raise ProviderError(f"{self.name}: the stream ended before the answer was complete", retryable=True)


def _parse(name: str, raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ProviderError(f"{name}: malformed chunk {raw[:80]!r}", retryable=True) from None
    if not isinstance(obj, dict):
        raise ProviderError(f"{name}: malformed chunk {raw[:80]!r}", retryable=True)
    err = obj.get("error")
    if err:
        message = err.get("message", err) if isinstance(err, dict) else err
        raise ProviderError(f"{name}: provider error: {message}", retryable=True)
    return obj


class OllamaProvider(_HttpProvider):
    """Ollama's ``/api/chat``, streamed (see the module docstring)."""

    name = "ollama"

    async def chat(self, messages: list[dict[str, str]], options: dict[str, Any], on_delta: OnDelta) -> ChatResult:
        """Stream one chat completion; ``on_delta`` gets each piece of text as it arrives.

        Raises:
            ProviderError: see the module docstring.
        """
        opts = dict(options)
        model = str(opts.pop("model", self.model))
        if "max_tokens" in opts:
            opts["num_predict"] = opts.pop("max_tokens")
        parts: list[str] = []
        result = ChatResult("", model)

        async def handle(line: str) -> bool:
            obj = _parse(self.name, line)
            content = (obj.get("message") or {}).get("content", "")
            if not isinstance(content, str):
                raise ProviderError(f"{self.name}: malformed chunk {line[:80]!r}", retryable=True)
            if content:
                parts.append(content)
                await on_delta(content)
            if obj.get("done"):
                result.prompt_tokens = int(obj.get("prompt_eval_count") or 0)
                result.completion_tokens = int(obj.get("eval_count") or 0)
                result.finish_reason = str(obj.get("done_reason") or "stop")
                return True
            return False

        await self._lines("/api/chat", {"model": model, "messages": messages, "stream": True, "options": opts}, handle)
        result.text = "".join(parts)
        return result


class OpenAIProvider(_HttpProvider):
    """An OpenAI-compatible ``/v1/chat/completions``, streamed as Server-Sent Events."""

    name = "openai"

    async def chat(self, messages: list[dict[str, str]], options: dict[str, Any], on_delta: OnDelta) -> ChatResult:
        """Stream one chat completion; ``on_delta`` gets each piece of text as it arrives.

        Raises:
            ProviderError: see the module docstring.
        """
        opts = dict(options)
        model = str(opts.pop("model", self.model))
        parts: list[str] = []
        result = ChatResult("", model)
        body = {"model": model, "messages": messages, "stream": True, "stream_options": {"include_usage": True}, **opts}

        async def handle(line: str) -> bool:
            if not line.startswith("data:"):
                return False  # SSE comments, event names, ids
            data = line[5:].strip()
            if data == "[DONE]":
                return True
            obj = _parse(self.name, data)
            usage = obj.get("usage")
            if isinstance(usage, dict):
                result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                result.completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in obj.get("choices") or []:
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str) and content:
                    parts.append(content)
                    await on_delta(content)
                if choice.get("finish_reason"):
                    result.finish_reason = str(choice["finish_reason"])
            return False

        await self._lines("/v1/chat/completions", body, handle)
        result.text = "".join(parts)
        return result
