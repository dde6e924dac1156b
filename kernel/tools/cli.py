"""The ``aiwfe`` command line. Run ``aiwfe --help`` or ``aiwfe COMMAND --help``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import logs

__all__ = ["main"]

DEFAULT_MANIFEST = "manifests/monolith.toml"


def cmd_check(args: argparse.Namespace) -> int:
    from .check import Problem, check_manifests, load_for_check

    problems: list[Problem] = []
    manifests = []
    for path in args.manifests:
        m, found = load_for_check(path)
        problems.extend(found)
        if m is not None:
            manifests.append(m)
    problems.extend(check_manifests(manifests))
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    pods = sum(len(m.pods) for m in manifests)
    print(f"ok: {len(manifests)} manifest(s), {pods} pod(s)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ..manifest import load_manifest
    from ..pod import PodRunner
    from .connect import make_bus

    manifest = load_manifest(args.manifest)
    pod_name = args.pod
    if pod_name is None:
        if len(manifest.pods) != 1:
            print(f"--pod is required: {args.manifest} has pods {', '.join(manifest.pods)}", file=sys.stderr)
            return 2
        pod_name = next(iter(manifest.pods))
    logs.setup(pod_name, verbose=args.verbose)

    async def run() -> None:
        bus = make_bus(manifest, name=f"{manifest.system.name}-{pod_name}", connect_timeout_s=None)
        runner = PodRunner(manifest, pod_name, bus, ops_port=args.ops_port, ops_host=args.ops_host)
        await runner.serve_forever()

    from ..errors import Unavailable

    try:
        asyncio.run(run())
    except Unavailable as e:  # e.g. NATS refused the credentials: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .up import up

    logs.setup("up", verbose=args.verbose)
    return up(args.manifest, data_dir=Path(args.data_dir), llm=args.llm, model=args.model)


def cmd_dlq(args: argparse.Namespace) -> int:
    from .publish import dead_letters, target

    t = target(args.url, args.prefix, args.data_dir)
    return asyncio.run(dead_letters(t.url, t.prefix, args.action, kind=args.kind, job_id=args.job_id, source=t.source))


def cmd_retire_kind(args: argparse.Namespace) -> int:
    from .publish import retire_kinds, target

    return asyncio.run(retire_kinds(target(args.url, args.prefix, args.data_dir), args.kinds))


def cmd_publish(args: argparse.Namespace) -> int:
    from .publish import publish, target

    try:
        payload = json.loads(args.json)
    except json.JSONDecodeError as e:
        print(f"JSON argument is not valid JSON: {e}", file=sys.stderr)
        return 2
    t = target(args.url, args.prefix, args.data_dir)
    return asyncio.run(
        publish(t.url, args.subject, payload, wait=args.wait, timeout_s=args.timeout, prefix=t.prefix, source=t.source)
    )


def cmd_loadtest(args: argparse.Namespace) -> int:
    loadtest = importlib.import_module("aiwfe.bench.loadtest")  # only when asked: the benchmarks are not a dependency
    return int(loadtest.main([args.scenario, *args.rest]) or 0)


def cmd_bench(args: argparse.Namespace) -> int:
    name = args.name.replace("-", "_")
    try:
        mod = importlib.import_module(f"aiwfe.bench.{name}")
    except ModuleNotFoundError:
        available = sorted(p.stem for p in Path(importlib.import_module("aiwfe.bench").__file__ or ".").parent.glob("[a-z]*.py"))
        print(f"unknown benchmark {args.name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    return int(mod.main(args.rest) or 0)


def cmd_k8s(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..manifest import parse_manifest
    from .k8s import hints, render, to_yaml

    try:
        text = Path(args.manifest).read_text()
    except OSError as e:
        raise ConfigError(f"{args.manifest}: cannot read manifest: {e.strerror}") from None
    manifest = parse_manifest(text, args.manifest)
    passwords = None
    if args.nats_passwords:
        from .natsauth import load_passwords, permissions

        passwords = load_passwords(Path(args.nats_passwords), list(permissions(manifest)))
    files = render(manifest, text, image=args.image, passwords=passwords)
    for hint in hints(manifest, text):
        print(f"warning: {hint}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(to_yaml(doc for docs in files.values() for doc in docs))
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for stem, docs in files.items():
        (out / f"{stem}.yaml").write_text(to_yaml(docs))
    print(f"wrote {len(files)} file(s) to {out}: {', '.join(f'{stem}.yaml' for stem in files)}")
    return 0


def cmd_recompose(args: argparse.Namespace) -> int:
    from ..manifest import load_manifest
    from . import natsauth, recompose

    old, new = load_manifest(args.old), load_manifest(args.new)
    plan = recompose.plan(old, new)
    if args.nats_config:
        perms = recompose.transition_permissions(old, new)
        sys.stdout.write(natsauth.render_config(perms, natsauth.load_passwords(Path(args.nats_config), list(perms))))
        return 0
    sys.stdout.write(recompose.render_steps(plan, old, new, args.old, args.new))
    return 0


def _target_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data-dir", help="read system.json that `aiwfe up` wrote here (default $AIWFE_DATA_DIR, else .aiwfe)")
    s.add_argument(
        "--url", help="NATS URL, credentials in it or in NATS_USER/NATS_PASSWORD (default: system.json, else $NATS_URL)"
    )
    s.add_argument("--prefix", help="subject prefix (default: system.json's, else aiwfe)")


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from ..manifest import load_manifest
    from .asyncapi import for_manifest

    doc = for_manifest(load_manifest(args.manifest))
    if args.output is not None and args.output.endswith((".yaml", ".yml")):
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aiwfe", description="AIWFE: a message-bus microkernel for AI workflows")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("up", help="development: embedded services where no URL is set, then every pod of the manifest")
    s.add_argument("-m", "--manifest", default=DEFAULT_MANIFEST, help=f"manifest (default {DEFAULT_MANIFEST})")
    s.add_argument("--data-dir", default=".aiwfe", help="where embedded services keep their data (default .aiwfe)")
    s.add_argument("--llm", default="", metavar="URL", help="an Ollama or OpenAI-compatible (…/v1) server for reasoning")
    s.add_argument("--model", default="", help="the model --llm asks (default: the first the server lists)")
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("run", help="production: run one pod of a manifest (what a container runs)")
    s.add_argument("-m", "--manifest", required=True)
    s.add_argument("--pod", help="pod name (optional for a one-pod manifest)")
    s.add_argument("--ops-port", type=int, default=None, help="ops port for /health /ready /metrics (default: the manifest's)")
    s.add_argument(
        "--ops-host",
        default=os.environ.get("AIWFE_OPS_HOST", "127.0.0.1"),
        help="address the ops endpoint binds (default $AIWFE_OPS_HOST, else 127.0.0.1; containers use 0.0.0.0)",
    )
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("check", help="validate manifests; lists every problem with a hint; non-zero exit on any")
    s.add_argument("manifests", nargs="+")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("publish", help="submit a job (SUBJECT <prefix>.submit.<kind>: its pod validates it) or make an RPC")
    s.add_argument("subject", help="e.g. aiwfe.submit.helios.ask (or aiwfe.jobs.helios.ask) or aiwfe.perception.perceive")
    s.add_argument("json", help="the message as JSON")
    s.add_argument("--wait", action="store_true", help="jobs: wait for the result and print it")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply or result (default 30)")
    _target_args(s)
    s.set_defaults(fn=cmd_publish)

    s = sub.add_parser("dlq", help="list dead-lettered jobs with their reasons, or replay them")
    s.add_argument("action", choices=["list", "replay"], help="list: one JSON line per dead letter; replay: re-queue them")
    s.add_argument("--kind", help="only this job kind (e.g. helios.ask)")
    s.add_argument("--job-id", help="only this job")
    _target_args(s)
    s.set_defaults(fn=cmd_dlq)

    s = sub.add_parser(
        "retire-kind",
        help="stop the jobs stream taking job kinds no pod serves any more (refused while jobs of them are queued "
        "or a pod still pulls them); one JSON line per kind",
    )
    s.add_argument("kinds", nargs="+", metavar="KIND", help="a job address, e.g. helios.ask")
    _target_args(s)
    s.set_defaults(fn=cmd_retire_kind)

    s = sub.add_parser("loadtest", help="run a load scenario (normal, peak, stress, websocket); a table, then one JSON line")
    s.add_argument("scenario", help="normal | peak | stress | websocket")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="scenario options (see aiwfe loadtest SCENARIO --help)")
    s.set_defaults(fn=cmd_loadtest)

    s = sub.add_parser("bench", help="run a benchmark in bench/; its last output line is one JSON object")
    s.add_argument("name", help="rpc, ...")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see aiwfe bench NAME --help)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("k8s", help="render Kubernetes YAML for every pod of a manifest")
    s.add_argument("manifest")
    s.add_argument("--image", default="aiwfe:latest", help="container image (default aiwfe:latest)")
    s.add_argument("-o", "--output", metavar="DIR", help="write one file per pod plus the ConfigMap into DIR (default: stdout)")
    s.add_argument(
        "--nats-passwords",
        metavar="FILE",
        help="keep the NATS users' passwords in FILE (created mode 0600, reused); default: new ones on every render",
    )
    s.set_defaults(fn=cmd_k8s)

    s = sub.add_parser("recompose", help="move plugins between pods without loss: which pods to start and drain, in order")
    s.add_argument("old", help="the manifest running now")
    s.add_argument("new", help="the manifest to move to (the same plugins, another split)")
    s.add_argument(
        "--nats-config",
        metavar="PASSWORDS",
        help="print the nats-server authorization for the transition (both manifests' users; passwords kept in PASSWORDS)",
    )
    s.set_defaults(fn=cmd_recompose)

    s = sub.add_parser("asyncapi", help="the AsyncAPI 3 document (JSON) of every NATS subject a manifest serves")
    s.add_argument("manifest")
    s.add_argument("-o", "--output", metavar="FILE", help="write the document to FILE, YAML for .yaml/.yml (default: stdout)")
    s.set_defaults(fn=cmd_asyncapi)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aiwfe`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logs.setup("aiwfe", verbose=args.verbose)
    from ..errors import ConfigError

    try:
        return int(args.fn(args) or 0)
    except ConfigError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
