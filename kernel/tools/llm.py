"""``aiwfe up --llm URL [--model M]``: which LLM API a URL speaks, and which model to ask.

The URL selects the API, in this order:

1. a scheme hint: ``ollama+http://host:11434`` or ``openai+https://host/v1`` (the hint is
   dropped from the URL the providers use);
2. a path ending in ``/v1``: OpenAI-compatible (vLLM, llama.cpp's server, LM Studio, Ollama's
   own ``/v1``, api.openai.com/v1);
3. otherwise a probe: ``GET /api/tags`` answering ``{"models": [...]}`` is Ollama, else
   ``GET /v1/models`` answering ``{"data": [...]}`` is OpenAI-compatible.

Without ``--model`` the first model the server lists is asked (``/api/tags`` or
``/v1/models``). With both the API (1 or 2) and the model known, the server is not
contacted at start: the reasoning plugin retries while it comes up. ``OPENAI_API_KEY``,
when set, goes with the probe of an OpenAI-compatible server as it goes with every call.

The result sets ``AIWFE_LLM_PROVIDER``, ``AIWFE_LLM_URL`` and ``AIWFE_LLM_MODEL``, which the
shipped manifests interpolate into ``[plugins.reasoning]`` (provider, base URL, model) and
``[plugins.helios]`` (the answer cache's key), for every pod ``aiwfe up`` starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import ConfigError
from ..manifest import Manifest

__all__ = ["LLM_ENV", "LlmTarget", "check_manifest_takes", "resolve_llm", "shown"]

#: the variables the shipped manifests read for ``[plugins.reasoning]`` and ``[plugins.helios]``
LLM_ENV = ("AIWFE_LLM_PROVIDER", "AIWFE_LLM_URL", "AIWFE_LLM_MODEL")
_HINTS = {"ollama+": "ollama", "openai+": "openai"}


@dataclass(frozen=True)
class LlmTarget:
    """Where reasoning's provider calls go. ``base_url`` is what the provider appends
    ``/api/chat`` (ollama) or ``/v1/chat/completions`` (openai) to; ``how`` says how the
    API and the model were chosen, for the log."""

    provider: str
    base_url: str
    model: str
    how: str

    def env(self) -> dict[str, str]:
        """The environment the manifests read (:data:`LLM_ENV`)."""
        return dict(zip(LLM_ENV, (self.provider, self.base_url, self.model), strict=True))


def resolve_llm(url: str, model: str = "", *, api_key: str | None = None, timeout_s: float = 5.0) -> LlmTarget:
    """Decide the API and the model for ``url`` (see the module docstring).

    Raises:
        ConfigError: a URL that is not http(s), a server that speaks neither API, or one
            that lists no model when none was given.
    """
    provider = ""
    for prefix, name in _HINTS.items():
        if url.startswith(prefix):
            provider, url = name, url.removeprefix(prefix)
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--llm {shown(url)!r}: not an http(s) URL (e.g. http://127.0.0.1:11434 or http://host:8000/v1)")
    path = parts.path.rstrip("/")
    how = f"{provider}+ in the URL" if provider else ""
    if path.endswith("/v1") and provider != "ollama":
        provider, path, how = "openai", path.removesuffix("/v1"), how or "the URL's path ends in /v1"
    base = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
    key = os.environ.get("OPENAI_API_KEY", "") if api_key is None else api_key
    if provider and model:
        return LlmTarget(provider, base, model, f"API from {how}; model given")
    with httpx.Client(base_url=base, timeout=timeout_s) as client:
        listed: dict[str, list[str] | str] = {}
        for api in [provider] if provider else ["ollama", "openai"]:
            listed[api] = _models(client, api, key)
            if isinstance(listed[api], list):
                provider, how = api, how or f"GET {_LIST[api]} answered"
                break
    if not provider:
        said = "; ".join(f"GET {_LIST[api]}: {what}" for api, what in listed.items())
        raise ConfigError(
            f"--llm {shown(base)}: speaks neither Ollama nor an OpenAI-compatible API ({said}); "
            "name the API with ollama+http://... or openai+http://..., or end an OpenAI-compatible URL with /v1"
        )
    names = listed[provider]
    if model:
        return LlmTarget(provider, base, model, f"API from {how}; model given")
    if isinstance(names, str):
        raise ConfigError(f"--llm {shown(base)}: cannot list its models (GET {_LIST[provider]}: {names}); pass --model")
    if not names:
        raise ConfigError(f"--llm {shown(base)}: the server lists no model (GET {_LIST[provider]}); pull one or pass --model")
    return LlmTarget(provider, base, names[0], f"API from {how}; model: the first of {len(names)} the server lists")


_LIST = {"ollama": "/api/tags", "openai": "/v1/models"}


def shown(url: str) -> str:
    """``url`` for logs and messages: a password in it replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@" + parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=netloc))


def _models(client: httpx.Client, api: str, api_key: str) -> list[str] | str:
    """The model names the server lists for ``api``, or why they could not be read."""
    headers = {"Authorization": f"Bearer {api_key}"} if api == "openai" and api_key else {}
    try:
        r = client.get(_LIST[api], headers=headers)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}"
    if r.status_code != 200:
        return f"HTTP {r.status_code}"
    try:
        body: Any = r.json()
        items = body["models"] if api == "ollama" else body["data"]
        return [str(m["name"] if api == "ollama" else m["id"]) for m in items]
    except (ValueError, KeyError, TypeError):
        return "not the API's JSON"


def check_manifest_takes(manifest: Manifest, target: LlmTarget) -> None:
    """Make sure ``--llm`` changes something: a pod runs reasoning and the manifest's
    ``[plugins.reasoning]`` took the provider, URL and model from :data:`LLM_ENV`.

    Raises:
        ConfigError: what does not match, with the fix.
    """
    if manifest.pod_of("reasoning") is None:
        raise ConfigError(f"--llm: no pod of {manifest.source} runs the reasoning plugin")
    cfg = manifest.plugins.get("reasoning", {})
    got = (cfg.get("provider"), cfg.get("base_url"), cfg.get("model"))
    if got != (target.provider, target.base_url, target.model):
        raise ConfigError(
            f"--llm: {manifest.source}'s [plugins.reasoning] has provider, base_url, model = {got}, not what --llm chose; "
            'write provider = "${AIWFE_LLM_PROVIDER:-extractive}", base_url = "${AIWFE_LLM_URL:-}", '
            'model = "${AIWFE_LLM_MODEL:-}" there, as the shipped manifests do'
        )
