"""An external AIWFE client written with FastStream: submit a JSON job, follow its events,
print its result. It imports nothing of AIWFE: the subjects and their JSON are the API.

    python examples/faststream_client/client.py --url nats://publisher:PASSWORD@127.0.0.1:4222 \\
        --kind helios.ask '{"text": "How do I speed up customer lookups?"}'
    python examples/faststream_client/client.py --system .aiwfe/system.json '{"text": "..."}'

(``--system``: the file ``aiwfe up`` writes; its ``publisher`` credentials and prefix are used.)

Prints one JSON line per job event (``{"seq", "type", "data"}``), then the outcome
``{"job_id", "status", "result"|"error"}``; exit status 0 when the job is done.

* ``<prefix>.submit.<kind>``: request with the job input as JSON; the reply is
  ``{"job_id"}``, or an ``Aiwfe-Error`` header (JSON ``type``, ``message``, ``retryable``)
  naming the bad field (``BadInput``), the size limit (``TooLarge``), ...
* ``<prefix>.status.job``: request ``{"job_id", "after_seq", "wait_s"}`` (a long-poll of at
  most 25 s); the reply has the new ``events``, ``last_seq`` to ask from next time, and
  ``final``/``status``/``result``/``error``.

Credentials come in the URL (``nats://user:password@host:port``); replies arrive under
the inbox prefix ``_INBOX.<user>``, the only inbox a restricted NATS user may read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from faststream.nats import NatsBroker

__all__ = ["JobError", "follow_job", "from_system", "main", "run", "submit_job"]

MAX_POLL_S = 25.0


class JobError(Exception):
    """An ``Aiwfe-Error`` reply: ``type``, ``message``, ``retryable``."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('type')}: {error.get('message')}")
        self.error = error


def inbox_prefix(url: str) -> str:
    """``_INBOX.<user>`` for a URL with credentials (what a restricted user may subscribe to), else ``_INBOX``."""
    user = urlsplit(url.split(",")[0].strip()).username
    return f"_INBOX.{unquote(user)}" if user else "_INBOX"


def from_system(path: str) -> tuple[str, str]:
    """(URL with the ``publisher`` credentials, prefix) from the ``system.json`` of ``aiwfe up``."""
    info = json.loads(Path(path).read_text())
    pub = info["publisher"]
    cred = f"{quote(pub['nats_user'], safe='')}:{quote(pub['nats_password'], safe='')}@"
    urls = []
    for part in str(info["nats_url"]).split(","):
        u = urlsplit(part.strip())
        urls.append(urlunsplit((u.scheme, cred + u.netloc.rpartition("@")[2], u.path, u.query, u.fragment)))
    return ",".join(urls), str(info.get("prefix") or "aiwfe")


async def _request(broker: NatsBroker, subject: str, body: dict[str, Any], timeout_s: float, **headers: str) -> Any:
    msg = await broker.request(body, subject, headers=headers or None, timeout=timeout_s)
    error = (msg.headers or {}).get("Aiwfe-Error")
    if error:
        raise JobError(json.loads(error))
    return await msg.decode()


async def submit_job(broker: NatsBroker, prefix: str, kind: str, job: dict[str, Any], *, key: str | None = None) -> str:
    """Submit ``job`` (the job's input) as JSON; return its id. Raises JobError (e.g. BadInput)."""
    headers = {"Aiwfe-Idempotency-Key": key} if key else {}
    reply = await _request(broker, f"{prefix}.submit.{kind}", job, 10.0, **headers)
    return str(reply["job_id"])


async def follow_job(
    broker: NatsBroker, prefix: str, job_id: str, *, timeout_s: float = 120.0, on_event: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Long-poll ``<prefix>.status.job`` until the job is final; call ``on_event`` for each
    event; return the last status reply. Raises TimeoutError after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    end, after = loop.time() + timeout_s, 0
    while (left := end - loop.time()) > 0:
        wait_s = min(left, MAX_POLL_S)
        poll = {"job_id": job_id, "after_seq": after, "wait_s": wait_s}
        status = await _request(broker, f"{prefix}.status.job", poll, wait_s + 5)
        for event in status["events"]:
            on_event(event)
        after = status["last_seq"]
        if status["final"]:
            return status  # type: ignore[no-any-return]
    raise TimeoutError(f"job {job_id} not final after {timeout_s} s")


async def run(url: str, prefix: str, kind: str, job: dict[str, Any], *, timeout_s: float = 120.0, key: str | None = None) -> int:
    """Connect, submit, follow, print (see the module docstring); return the exit status."""
    broker = NatsBroker(url, inbox_prefix=inbox_prefix(url), connect_timeout=5)
    await broker.connect()
    try:
        try:
            job_id = await submit_job(broker, prefix, kind, job, key=key)
        except JobError as e:
            print(json.dumps({"error": e.error}))
            return 1
        status = await follow_job(broker, prefix, job_id, timeout_s=timeout_s, on_event=lambda ev: print(json.dumps(ev)))
        done = status["status"] == "done"
        out = {"job_id": job_id, "status": status["status"]}
        out.update({"result": status["result"]} if done else {"error": status["error"]})
        print(json.dumps(out))
        return 0 if done else 1
    finally:
        await broker.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Submit a JSON job to AIWFE over NATS (FastStream) and follow it.")
    p.add_argument("input", help="the job's input as JSON")
    p.add_argument("--url", default="nats://127.0.0.1:4222", help="NATS URL, credentials included (nats://user:pw@host:port)")
    p.add_argument("--prefix", default=None, help="subject prefix (default aiwfe, or the system file's)")
    p.add_argument("--system", default=None, help="the system.json of `aiwfe up`: its publisher credentials and prefix")
    p.add_argument("--kind", default="helios.ask", help="job kind (default helios.ask)")
    p.add_argument("--key", default=None, help="idempotency key (the same key gives the same job)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the outcome")
    a = p.parse_args(argv)
    url, prefix = from_system(a.system) if a.system else (a.url, "aiwfe")
    job = json.loads(a.input)
    return asyncio.run(run(url, a.prefix or prefix, a.kind, job, timeout_s=a.timeout, key=a.key or uuid.uuid4().hex))


if __name__ == "__main__":
    sys.exit(main())
