"""``aiwfe publish``: submit a job or make an RPC from the shell, as an external JSON publisher.

Where to connect (:func:`target`): ``--url`` (credentials in it, or in ``NATS_USER`` /
``NATS_PASSWORD`` and the other ``NATS_*`` variables), else the ``system.json`` that
``aiwfe up`` wrote under ``--data-dir`` (its ``admin`` user), else ``NATS_URL``. An unreachable server or refused credentials
give one line naming the URL and what to do, and exit status 1.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from aiwfe.bus.codec import H_CONTENT_TYPE, H_ERROR, JSON

__all__ = ["Target", "dead_letters", "publish", "target"]


class Target(msgspec.Struct, frozen=True):
    """Where the shell tools connect: a NATS URL (credentials in it or in the environment),
    the subject prefix, and what named them (for error messages)."""

    url: str
    prefix: str
    source: str


def target(url: str | None, prefix: str | None, data_dir: str | None) -> Target:
    """Resolve ``--url`` / ``--prefix`` / ``--data-dir`` (see the module docstring).

    ``data_dir`` None: ``$AIWFE_DATA_DIR``, else ``.aiwfe``.

    Raises:
        ConfigError: nothing names a server, or ``system.json`` does not parse.
    """
    import os
    from pathlib import Path

    from ..errors import ConfigError
    from .natsauth import user_url
    from .up import SYSTEM_FILE

    if url:
        return Target(url, prefix or "aiwfe", "--url")
    path = Path(data_dir or os.environ.get("AIWFE_DATA_DIR") or ".aiwfe") / SYSTEM_FILE
    if path.exists():
        try:
            info = json.loads(path.read_text())
            nats_url = str(info["nats_url"])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ConfigError(f"{path}: not a system file written by `aiwfe up` ({e!r})") from None
        if info.get("nats_user") and info.get("nats_password"):
            nats_url = user_url(nats_url, str(info["nats_user"]), str(info["nats_password"]))
        return Target(nats_url, prefix or str(info.get("prefix") or "aiwfe"), str(path))
    env_url = os.environ.get("NATS_URL")
    if env_url:
        return Target(env_url, prefix or "aiwfe", "$NATS_URL")
    raise ConfigError(f"no NATS to talk to: no {path} (start `aiwfe up`, or pass --data-dir, --url or set NATS_URL)")


async def _connect(t: Target, name: str, *, manage_streams: bool = True) -> Any:
    """A started NatsBus, or None after printing one line saying why not and what to do.

    Credentials and TLS: the URL's userinfo and, unless the URL came from ``system.json``,
    the ``NATS_*`` environment variables (:func:`aiwfe.kernel.tools.connect.nats_connect_options`;
    raises ConfigError).
    """
    from aiwfe.bus.errors import BusError
    from aiwfe.bus.nats import NatsBus
    from aiwfe.bus.nats_connect import NatsConnectOptions

    from .connect import nats_connect_options
    from .up import SYSTEM_FILE

    options = NatsConnectOptions() if t.source.endswith(SYSTEM_FILE) else nats_connect_options()
    bus = NatsBus(t.url, t.prefix, name=name, connect_timeout_s=5.0, connect_options=options, manage_streams=manage_streams)
    try:
        await bus.start()
    except BusError as e:
        if "refused" in str(e):  # wrong credentials, TLS: the message says which and what to check
            print(f"error: {e}", file=sys.stderr)
        else:
            print(
                f"error: cannot reach NATS at {bus.url} (from {t.source}); is `aiwfe up` running? Start it, or pass --url",
                file=sys.stderr,
            )
        return None
    return bus


async def publish(
    url: str, subject: str, payload: Any, *, wait: bool, timeout_s: float, prefix: str = "aiwfe", source: str = "--url"
) -> int:
    """Publish ``payload`` as JSON. Jobs (``<prefix>.submit.<kind>`` or ``<prefix>.jobs.<kind>``)
    go through the submit subject (validated by the consumer's pod) and print ``{"job_id"}``
    and, with ``wait``, the outcome (:mod:`aiwfe.kernel.tools.submit`); RPCs print the reply.
    A subject nobody serves fails with the known job kinds. Returns the exit status.
    ``source``: what named ``url`` (``--url``, a ``system.json``), for the error line.
    """
    from aiwfe.bus.errors import BusError, BusTimeout, NoResponders
    from aiwfe.kernel.errors import AiwfeError, DeadlineExceeded, Unavailable, from_wire

    from .submit import hint, job_kind, known_kinds, print_error, submit_job

    # only requests (submit, status, RPC): no stream is touched, so the `publisher` user can publish
    bus = await _connect(Target(url, prefix, source), "aiwfe-publish", manage_streams=False)
    if bus is None:
        return 1
    try:
        data = json.dumps(payload).encode()
        headers = {H_CONTENT_TYPE: JSON}
        kind = job_kind(subject, prefix)
        if kind is not None:
            return await submit_job(bus, prefix, kind, data, wait=wait, timeout_s=timeout_s)
        try:
            reply, rh = await bus.request(subject, data, headers, timeout_s)
        except NoResponders:
            return print_error("unavailable", f"no pod serves {subject}; {hint(await known_kinds(bus))}", True)
        except BusTimeout as e:
            raise DeadlineExceeded(str(e)) from None
        except BusError as e:
            raise Unavailable(str(e)) from None
        if rh and H_ERROR in rh:
            err = from_wire(rh[H_ERROR])
            print(json.dumps({"error": {"code": err.code, "message": str(err), "retryable": err.retryable}}))
            return 1
        print(reply.decode())
        return 0
    except AiwfeError as e:
        print(json.dumps({"error": {"code": e.code, "message": str(e), "retryable": e.retryable}}))
        return 1
    finally:
        await bus.close()


async def dead_letters(url: str, prefix: str, action: str, *, kind: str | None, job_id: str | None, source: str = "--url") -> int:
    """``aiwfe dlq list|replay``: print dead letters (one JSON object per line) or re-queue them.

    Returns the exit status (1 when NATS cannot be reached).
    """
    from aiwfe.bus.codec import H_ATTEMPTS, H_JOB_ID, H_REASON
    from aiwfe.kernel import admin
    from aiwfe.kernel.jobs import Jobs

    bus = await _connect(Target(url, prefix, source), "aiwfe-dlq")
    if bus is None:
        return 1
    jobs = Jobs(bus)
    try:
        if action == "replay":
            ids = await admin.replay_dead_letters(jobs, kind, job_id)
            print(json.dumps({"replayed": ids}))
            return 0
        for data, headers in await admin.dead_letters(jobs, kind):
            if job_id is not None and headers.get(H_JOB_ID) != job_id:
                continue
            try:
                payload = msgspec.msgpack.decode(data) if headers.get(H_CONTENT_TYPE) != JSON else json.loads(data)
            except (msgspec.DecodeError, ValueError):
                payload = data.decode(errors="replace")
            reason = json.loads(headers.get(H_REASON, "{}"))
            print(
                json.dumps(
                    {
                        "job_id": headers.get(H_JOB_ID),
                        "attempts": int(a) if (a := headers.get(H_ATTEMPTS, "0")).isdecimal() and len(a) < 10 else None,
                        "reason": reason,
                        "payload": payload,
                    },
                    default=str,
                )
            )
        return 0
    finally:
        await bus.close()


async def retire_kinds(t: Target, kinds: list[str]) -> int:
    """``aiwfe retire-kind``: stop the jobs stream taking ``kinds`` (see
    :meth:`aiwfe.bus.nats_queue.QueueMixin.retire_kind`); one line per kind.

    Returns the exit status: 2 for a name that is no job address, 1 when NATS cannot be
    reached or a kind could not be retired (jobs still queued, a pod still pulling them).
    """
    from aiwfe.bus.errors import BusError
    from aiwfe.kernel.contract import ADDRESS_RE

    bad = [k for k in kinds if not ADDRESS_RE.match(k) or len(k) > 128]
    if bad:
        print(f"error: not a job address (e.g. helios.ask): {', '.join(map(repr, bad))}", file=sys.stderr)
        return 2
    bus = await _connect(t, "aiwfe-retire-kind")
    if bus is None:
        return 1
    status = 0
    try:
        before = set(await bus.job_kinds())
        for kind in kinds:
            if kind not in before:
                print(json.dumps({"kind": kind, "retired": False, "why": "the jobs stream does not take it"}))
                continue
            try:
                await bus.retire_kind(kind)
            except BusError as e:
                status = 1
                print(json.dumps({"kind": kind, "retired": False, "why": str(e)}))
                continue
            print(json.dumps({"kind": kind, "retired": True}))
        return status
    finally:
        await bus.close()
