"""A running system under one placement, and the helpers a test body uses on it.

:func:`start_system` starts a :class:`SystemSpec` under a :class:`Placement`: in-process on a
LocalBus for ``monolith``; otherwise every pod an ``aiwfe run`` child on a nats-server of the
system's own with authorization on, as ``aiwfe up`` runs it — each pod logs in as its own
least-privilege user (``pod-<name>``), the test's client as the operator (``admin``), and a
permission violation in the server's log fails the system on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from aiwfe.kernel.manifest import Manifest, load_manifest
from aiwfe.kernel.routing import Kernel
from aiwfe.kernel.tools.embedded import free_port

from .placement import Placement, SystemSpec, build_manifest
from .pods import PodProcess, dump_toml, run_pods, start_pod, wait_ready
from .servers import SecuredNats, secured_nats

__all__ = ["PlacementMismatch", "System", "start_system"]


class PlacementMismatch(AssertionError):
    """A result recorded under one placement differs from the one recorded under another."""


class System:
    """One placement, running.

    ``placement``, ``manifest`` (as the pods load it), ``prefix`` (subject prefix), ``kernel``
    (a client kernel with no plugins: ``call``, ``submit``, ``wait_job``, ``job_events``...),
    ``pods`` (name → :class:`PodProcess`, or :class:`PodRunner` in-process), ``gateway_url``
    (None without a gateway), ``nats`` (the :class:`SecuredNats` of process placements).
    """

    def __init__(self, placement: Placement, manifest: Manifest, path: Path, kernel: Kernel, pods: dict[str, Any]) -> None:
        self.placement = placement
        self.manifest = manifest
        self.manifest_path = path
        self.prefix = manifest.system.subject_prefix
        self.kernel = kernel
        self.pods = pods
        self.nats: SecuredNats | None = None
        self.env: dict[str, str] = {}
        self.workdir = path.parent
        self.records: dict[str, Any] = {}
        self.recorder: Callable[[str, Any], None] | None = None
        gw = manifest.plugins.get("gateway") if manifest.pod_of("gateway") else None
        self.gateway_url: str | None = f"http://127.0.0.1:{int(gw['port'])}" if gw and gw.get("port") else None

    # -- calls and jobs --------------------------------------------------------------------

    async def call(self, req: Any, *, timeout_s: float | None = None) -> Any:
        """Call a request contract; returns its reply (raises what the kernel raises)."""
        return await self.kernel.call(req, timeout_s=timeout_s)

    async def submit(self, job: Any, **kw: Any) -> str:
        """Submit a job; returns its id."""
        return await self.kernel.submit(job, **kw)

    async def submit_and_wait(self, job: Any, *, timeout_s: float = 30.0, **kw: Any) -> Any:
        """Submit a job and wait for its :class:`JobRecord` (``status``, ``result``, ``error``, ``attempts``)."""
        return await self.kernel.wait_job(await self.kernel.submit(job, **kw), timeout_s=timeout_s)

    async def result(self, job: Any, type: Any = Any, *, timeout_s: float = 30.0, **kw: Any) -> Any:
        """Submit a job, wait, and return its decoded result (as ``type``; plain data by default).

        Raises:
            AssertionError: the job did not finish ``done`` (the message holds its error).
        """
        rec = await self.submit_and_wait(job, timeout_s=timeout_s, **kw)
        assert rec.status == "done", f"job {rec.job_id} {rec.status}: {rec.error}"
        return msgspec.msgpack.decode(rec.result, type=type)

    async def events(self, job_id: str, *, timeout_s: float = 30.0) -> list[Any]:
        """Every event of job ``job_id`` up to its terminal one (``job.done``, ``job.failed``...)."""
        out: list[Any] = []
        async with asyncio.timeout(timeout_s):
            async for ev in self.kernel.job_events(job_id):
                out.append(ev)
        return out

    # -- the gateway -------------------------------------------------------------------------

    def http(self, **kw: Any) -> Any:
        """An ``httpx.AsyncClient`` on the gateway (use ``async with``).

        Raises:
            LookupError: the system has no gateway.
        """
        import httpx

        return httpx.AsyncClient(base_url=self._gateway(), **{"timeout": 30, **kw})

    def ws(self, token: str | None = None, path: str = "/v1/ws", **kw: Any) -> Any:
        """A WebSocket connection to the gateway (``async with system.ws(token) as ws:``), the
        token sent as ``Authorization: Bearer``."""
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return connect(self._gateway().replace("http://", "ws://") + path, additional_headers=headers, **kw)

    def _gateway(self) -> str:
        if self.gateway_url is None:
            raise LookupError(f"no gateway in this system (pods: {', '.join(self.pods)})")
        return self.gateway_url

    # -- pods ------------------------------------------------------------------------------------

    def pod_of(self, plugin: str) -> str:
        """The pod that runs ``plugin``."""
        pod = self.manifest.pod_of(plugin)
        if pod is None:
            raise LookupError(f"no pod runs {plugin!r}")
        return pod

    def _process(self, pod: str) -> PodProcess:
        if self.placement.in_process:
            raise RuntimeError(
                f"placement {self.placement}: the pods run in the test's process; kill and restart need a process placement"
            )
        return self.pods[pod]  # type: ignore[no-any-return]

    async def kill(self, pod: str) -> None:
        """``kill -9`` pod ``pod`` (its in-flight work is lost to it; JetStream redelivers jobs)."""
        pp = self._process(pod)
        if pp.proc.poll() is None:
            pp.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(pp.proc.wait)

    async def stop(self, pod: str) -> None:
        """Stop pod ``pod`` gracefully (SIGTERM: stop taking work, drain, close)."""
        pp = self._process(pod)
        if pp.proc.poll() is None:
            pp.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(pp.proc.wait, 30)

    async def restart(self, pod: str, *, timeout_s: float = 60.0) -> None:
        """Start pod ``pod`` again (killed or stopped, or stop it first) and wait until it is ready."""
        pp = self._process(pod)
        if pp.proc.poll() is None:
            await self.stop(pod)
        env = {**self.env, **(self.nats.pod_env(pod) if self.nats else {})}
        new = start_pod(self.manifest_path, pod, env, self.workdir)
        self.pods[pod] = new
        await asyncio.to_thread(wait_ready, [new], timeout_s)

    # -- results across placements ------------------------------------------------------------

    def record(self, key: str, value: Any) -> None:
        """Record a result under ``key``: the marker compares it with the same key's value under
        every other placement of the test (:class:`PlacementMismatch` when they differ)."""
        self.records[key] = value
        if self.recorder is not None:
            self.recorder(key, value)


@contextlib.contextmanager
def _environ(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.asynccontextmanager
async def start_system(
    spec: SystemSpec,
    placement: Placement | str,
    workdir: Path,
    *,
    prefix: str | None = None,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    check_violations: bool = True,
) -> AsyncIterator[System]:
    """Start ``spec`` under ``placement`` with files under ``workdir``; yield a :class:`System`.

    ``env`` (the service URLs, say) and ``spec.env`` reach every pod; ``AIWFE_PREFIX`` (the
    prefix), ``AIWFE_DATA_DIR``, ``AIWFE_GATEWAY_PORT`` and a random ``JWT_SECRET`` are set
    for manifests that read them. In-process pods see them in ``os.environ`` while they run.

    Raises:
        ConfigError: the manifest the spec gives is invalid.
        RuntimeError: a pod did not become ready (with its log's tail).
        AssertionError: on exit, the nats-server logged a permission violation.
    """
    placement = Placement.parse(placement)
    prefix = prefix or "t" + uuid.uuid4().hex[:12]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gateway_port = free_port() if spec.has_gateway else None
    full_env = {
        "AIWFE_PREFIX": prefix,
        "AIWFE_DATA_DIR": str(workdir / "data"),
        "JWT_SECRET": secrets.token_urlsafe(48),
        **({"AIWFE_GATEWAY_PORT": str(gateway_port)} if gateway_port else {}),
        **spec.env,
        **(env or {}),
    }
    path = workdir / f"{str(placement).replace(':', '-')}.toml"
    path.write_text(dump_toml(build_manifest(spec, placement, prefix, gateway_port)))
    manifest = load_manifest(path, env={**os.environ, **full_env})
    if placement.in_process:
        async with _in_process(manifest, full_env) as (kernel, pods):
            system = System(placement, manifest, path, kernel, pods)
            system.env = full_env
            yield system
        return
    async with _processes(manifest, path, full_env, workdir, ready_timeout_s, check_violations) as (kernel, pods, nats):
        system = System(placement, manifest, path, kernel, pods)
        system.env, system.nats = full_env, nats
        yield system


@contextlib.asynccontextmanager
async def _in_process(manifest: Manifest, env: dict[str, str]) -> AsyncIterator[tuple[Kernel, dict[str, Any]]]:
    from aiwfe.bus.local import LocalBus
    from aiwfe.kernel.pod import PodRunner

    local = LocalBus(manifest.system.subject_prefix)
    with _environ(env):
        async with contextlib.AsyncExitStack() as stack:
            pods = {}
            for name in manifest.pods:
                pods[name] = await stack.enter_async_context(PodRunner(manifest, name, local, ops_port=0))
            yield Kernel(local, call_timeout_s=manifest.system.call_timeout_s), pods


@contextlib.asynccontextmanager
async def _processes(
    manifest: Manifest, path: Path, env: dict[str, str], workdir: Path, ready_timeout_s: float, check_violations: bool
) -> AsyncIterator[tuple[Kernel, dict[str, Any], SecuredNats]]:
    from aiwfe.bus.nats import NatsBus
    from aiwfe.kernel.tools.natsauth import ADMIN

    with secured_nats(manifest, workdir) as nats:
        cm = run_pods(path, list(manifest.pods), env, workdir, ready_timeout_s, pod_env=nats.pod_env)
        pods = await asyncio.to_thread(cm.__enter__)
        try:
            bus = NatsBus(nats.url(ADMIN), manifest.system.subject_prefix, name="aiwfe-testing-client")
            try:
                await bus.start()
                yield Kernel(bus, call_timeout_s=manifest.system.call_timeout_s), pods, nats
            finally:
                await bus.close()
        finally:
            await asyncio.to_thread(cm.__exit__, None, None, None)
        violations = nats.violations()
    if check_violations:
        assert not violations, "NATS permission violations:\n" + "\n".join(violations)
