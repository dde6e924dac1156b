"""``GET /v1/asyncapi.json``: the AsyncAPI document of the running system's NATS surface.

The gateway has no manifest (a pod gets only its plugins' config), so it asks the running
pods: every pod answers ``<prefix>.control.status`` with its name, its plugins and the
subject prefix, and :func:`aiwfe.kernel.tools.asyncapi.for_pods` builds the document from
those plugins' contracts — the same generator as ``aiwfe asyncapi MANIFEST``, so both show
the same subjects for a system whose pods are all up (a pod that is down is missing until it
answers again). Status answers are untrusted input: names are bounded, and a plugin is
loaded only by its installed entry-point name or when its module is already imported here
(nothing is imported from a module path another process sent). The document is built in a
child process (``python -m aiwfe.kernel.tools.asyncapi``), so the other pods' plugin modules,
their imports and metrics never load into the gateway, and the event loop is not held; it is
rebuilt only when the layout changed, checked at most every ``ttl_s`` seconds, by one request
at a time; a build that fails or exceeds ``build_timeout_s`` answers 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec

from aiwfe.kernel import Unavailable
from aiwfe.kernel.plugin import KernelHandle, Plugin
from aiwfe.kernel.registry import discover

from .openapi import error_response

__all__ = ["BusDocument", "asyncapi_route"]

MAX_PODS = 256
MAX_PLUGINS = 64
MAX_NAME = 200


def _names(value: Any, limit: int) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value[:limit] if isinstance(v, str) and 0 < len(v) <= MAX_NAME]


def _loaded_plugin(name: str) -> bool:
    """True when ``module:Class`` names a Plugin class of a module this process already imported."""
    module, _, attr = name.partition(":")
    obj: Any = sys.modules.get(module)
    for part in attr.split(".") if obj is not None and attr else ():
        obj = vars(obj).get(part) if hasattr(obj, "__dict__") else None  # no __getattr__ hooks
    return isinstance(obj, type) and issubclass(obj, Plugin)


class BusDocument:
    """The cached AsyncAPI document of the pods that answer status requests through ``kernel``."""

    def __init__(
        self, kernel: KernelHandle, *, ttl_s: float = 10.0, status_timeout_s: float = 0.5, build_timeout_s: float = 30.0
    ) -> None:
        self.kernel = kernel
        self.ttl_s = ttl_s
        self.build_timeout_s = build_timeout_s
        self.status_timeout_s = status_timeout_s
        self._body: bytes | None = None
        self._layout: tuple[str, tuple[tuple[str, tuple[str, ...]], ...]] | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    def layout(self, statuses: list[dict[str, Any]]) -> tuple[str, dict[str, list[str]]]:
        """The prefix and pod → loadable plugin names of status answers (bounded, filtered)."""
        installed = discover()
        pods: dict[str, list[str]] = {}
        prefix = ""
        for s in statuses[:MAX_PODS]:
            if not isinstance(s, dict) or not isinstance(s.get("pod"), str) or len(s["pod"]) > MAX_NAME:
                continue
            if not prefix and isinstance(s.get("prefix"), str) and 0 < len(s["prefix"]) <= MAX_NAME:
                prefix = s["prefix"]
            plugins = _names(s.get("plugins"), MAX_PLUGINS)
            pods[s["pod"]] = [p for p in plugins if p in installed or _loaded_plugin(p)]
        return prefix or "aiwfe", pods

    async def body(self) -> bytes:
        """The document as JSON bytes (rebuilt when older than ``ttl_s``).

        Raises:
            AiwfeError: the status request failed (the gateway answers 503 for a retryable one).
        """
        if self._body is not None and time.monotonic() < self._until:
            return self._body
        async with self._lock:
            if self._body is not None and time.monotonic() < self._until:
                return self._body
            prefix, pods = self.layout(await self.kernel.cluster_status(self.status_timeout_s))
            key = (prefix, tuple(sorted((k, tuple(v)) for k, v in pods.items())))
            if self._body is None or key != self._layout:
                self._body, self._layout = await self._build(pods, prefix), key
            self._until = time.monotonic() + self.ttl_s
            return self._body

    async def _build(self, pods: dict[str, list[str]], prefix: str) -> bytes:
        """Run ``python -m aiwfe.kernel.tools.asyncapi`` on the layout; return its stdout.

        Raises:
            Unavailable: it failed or took longer than ``build_timeout_s``.
        """
        # The child finds what this process finds (plugins named module:Class included).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiwfe.kernel.tools.asyncapi",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        request = json.dumps({"pods": pods, "prefix": prefix, "name": prefix}).encode()
        try:
            out, err = await asyncio.wait_for(proc.communicate(request), self.build_timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise Unavailable(f"asyncapi: building the document took longer than {self.build_timeout_s} s") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"asyncapi: building the document failed: {tail[0][:300]}")
        return out


def asyncapi_route(doc: BusDocument) -> HTTPRouteHandler:
    """The ``GET /v1/asyncapi.json`` handler serving ``doc``."""

    @get(
        "/v1/asyncapi.json",
        tags=["ops"],
        media_type="application/json",
        responses={
            200: ResponseSpec(dict[str, Any], description="The AsyncAPI 3.0.0 document", generate_examples=False),
            503: error_response(503),
        },
    )
    async def asyncapi() -> Response[bytes]:
        """The AsyncAPI 3.0.0 document of the running system's NATS subjects (see `aiwfe asyncapi`)."""
        return Response(await doc.body(), media_type="application/json")

    return asyncapi
