"""Running one pod: load plugins, enter lifespans, wire handlers, drain on SIGTERM.

Start order: ops endpoint (so ``/health`` answers at once) → bus connection → plugin
lifespans in manifest order → handlers exposed on the bus → ready.
Stop order (Nameko's): not ready → stop taking work → drain in-flight work up to
``drain_timeout_s`` (unfinished jobs are nak'ed so another replica takes them at once)
→ lifespans left in reverse order → bus closed → ops endpoint closed.

Garbage collector tuning while ready: :mod:`aiwfe.kernel.gc_tuning`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import msgspec

from aiwfe.bus.base import Bus
from aiwfe.bus.errors import BusError

from . import gc_tuning, metrics, tracing
from ._ops import OpsServer, plugin_details, stuck_handlers
from .admin import answer_status
from .config_check import config_problems, handler_options, manifest_served
from .errors import ConfigError, Unavailable
from .manifest import Manifest
from .plugin import Plugin, handlers_of, validate_plugin_class
from .registry import discover, resolve
from .routing import Kernel

__all__ = ["PodRunner"]

log = logging.getLogger("aiwfe.pod")


class PodRunner:
    """One pod of ``manifest`` on ``bus``.

    Use as ``async with PodRunner(...) as pod:`` or call :meth:`serve_forever`.
    ``ops_port`` None takes the pod's ``ops_port`` from the manifest (0 = any free port).
    """

    def __init__(
        self, manifest: Manifest, pod: str, bus: Bus, *, ops_port: int | None = None, ops_host: str = "127.0.0.1"
    ) -> None:
        self.manifest = manifest
        self.pod_name = pod
        self.pod = manifest.pod(pod)
        self.bus = bus
        self.kernel = Kernel(bus, call_timeout_s=manifest.system.call_timeout_s)
        self.kernel.submissions.quotas.limits = manifest.system.jobs
        self.plugins: dict[str, Plugin] = {}
        port = self.pod.ops_port if ops_port is None else ops_port
        self.ops = OpsServer(
            pod, self._not_ready, ops_host, port, degraded=self._degraded, details=lambda: plugin_details(self.plugins)
        )
        self._stack = contextlib.AsyncExitStack()
        self._ready = False
        self._gc_before: tuple[int, ...] | None = None
        self._build()

    def _build(self) -> None:
        installed = discover()
        problems: list[str] = []
        for name in self.pod.plugins:
            try:
                cls = resolve(name, installed)
            except (LookupError, ImportError) as e:
                problems.append(str(e))
                continue
            found = validate_plugin_class(cls)
            if found:
                problems.extend(found)
                continue
            served = manifest_served(self.manifest) if cls.config_addresses else None
            cfg, bad = config_problems(cls, self.manifest.plugins.get(name, {}), served)
            if bad or cfg is None:
                problems.extend(f"[plugins.{name}]: {what} ({hint})" for what, hint in bad)
                continue
            plugin = cls(cfg, self.kernel.caller_for(cls.name, cls.calls, cls.privileges))
            self.plugins[name] = plugin
            for spec in handlers_of(cls):
                override = self.pod.handlers.get(spec.address)
                if override:
                    options, bad = handler_options(spec.options, override)
                    if bad or options is None:
                        where = f"[pods.{self.pod_name}.handlers.{spec.address!r}]"
                        problems.extend(f"{where}: {what} ({hint})" for what, hint in bad)
                        continue
                    spec = msgspec.structs.replace(spec, options=options)
                self.kernel.add(spec, plugin)
        if problems:
            raise ConfigError(f"pod {self.pod_name}: " + "; ".join(problems))

    def _not_ready(self) -> list[str]:
        reasons = []
        if not self._ready:
            reasons.append("starting or stopping")
        r = self.bus.ready()
        if r:
            reasons.append(r)
        for name, p in self.plugins.items():
            pr = p.readiness()
            if pr:
                reasons.append(f"{name}: {pr}")
        return reasons + stuck_handlers(self.kernel, all_slots=True)

    def _degraded(self) -> list[str]:
        notes = [f"{name}: {note}" for name, p in self.plugins.items() for note in p.degraded()]
        return notes + stuck_handlers(self.kernel, all_slots=False)

    def status(self) -> dict[str, Any]:
        """This pod's status as ``aiwfe`` pods report it to each other (``prefix``: the subject
        prefix, which the gateway's AsyncAPI document needs)."""
        reasons = self._not_ready()
        return {
            "pod": self.pod_name,
            "plugins": list(self.plugins),
            "ready": not reasons,
            "reasons": reasons,
            "degraded": self._degraded(),
            "details": plugin_details(self.plugins),
            "ops_url": self.ops.url,
            "prefix": self.bus.prefix,
        }

    @property
    def ready(self) -> bool:
        """True while serving and every dependency is up."""
        return not self._not_ready()

    async def start(self) -> None:
        """Start the pod (see the module docstring for the order)."""
        await self.ops.start()
        tracing.configure_from_env(f"{self.manifest.system.name}-{self.pod_name}", self.manifest.system.trace_sample_ratio)
        try:
            try:
                await self.bus.start()
            except BusError as e:
                raise Unavailable(str(e)) from None
            await self._stack.__aenter__()
            for name, plugin in self.plugins.items():
                log.info("pod %s: entering %s", self.pod_name, name)
                await self._stack.enter_async_context(plugin.lifespan())
            await self.kernel.start()
            await answer_status(self.bus, self.status)
            await self.bus.flush()  # the server has every subscription before we say ready
        except BaseException:
            await self._stack.aclose()
            await self.bus.close()
            await self.ops.close()
            raise
        self._gc_before = gc_tuning.tune(self.manifest.system.gc_thresholds)
        self._ready = True
        metrics.READY.labels(self.pod_name).set(1)
        log.info("pod %s ready: plugins %s, ops %s", self.pod_name, ", ".join(self.plugins), self.ops.url)

    async def stop(self) -> None:
        """Stop the pod gracefully (see the module docstring for the order)."""
        self._ready = False
        metrics.READY.labels(self.pod_name).set(0)
        await self.bus.stop_taking_work()
        self.kernel.jobs.stop()
        drained = await self.bus.wait_idle(self.manifest.system.drain_timeout_s)
        if not drained:
            log.warning("pod %s: drain limit reached; unfinished jobs returned to the stream", self.pod_name)
        await self._stack.aclose()
        await self.bus.close()
        await self.ops.close()
        gc_tuning.restore(self._gc_before)
        self._gc_before = None

    async def __aenter__(self) -> PodRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Run until SIGTERM or SIGINT (or ``stop`` is set), then stop gracefully."""
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("pod %s stopping", self.pod_name)
            await self.stop()
