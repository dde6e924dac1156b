"""The pieces of the AsyncAPI document (:mod:`aiwfe.kernel.tools.asyncapi`): channels,
operations, messages, header schemas and payload schemas, built contract by contract.

System perspective: the document describes the whole system, so a subject it serves is a
``receive`` operation (with a ``reply`` for request/reply) and a subject it emits is ``send``;
an external client does the opposite.

Ids: channels and operations are ``rpc-<address>``, ``submit-<kind>``, ``jobs-<kind>``,
``event-<address>``, ``job-events`` and ``status-job``; a reply channel adds ``-reply``.
Addresses never contain ``-``, so no two ids collide whatever the addresses.
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from ..contract import Message, address_of, reply_type, schema_hash
from ._asyncapi_schemas import HEADERS, ErrorInfo, JobReplayed, JobRetrying, StatusReply, StatusRequest, SubmitAccepted

__all__ = ["Parts", "Surface"]

JSON, MSGPACK = "application/json", "application/msgpack"


class Surface:
    """What a layout serves and uses, contract → pod names (:func:`aiwfe.kernel.tools.asyncapi.surface`)."""

    def __init__(self) -> None:
        self.requests: dict[type, set[str]] = {}
        self.callers: dict[type, set[str]] = {}
        self.jobs: dict[type, set[str]] = {}
        self.event_subscribers: dict[type, set[str]] = {}
        self.event_emitters: dict[type, set[str]] = {}
        self.job_events: set[type] = set()


REQUEST_H = ("traceparent", "Aiwfe-Deadline-Ms", "Aiwfe-Schema", "Content-Type")
REPLY_H = ("Aiwfe-Error", "Content-Type")
SUBMIT_H = ("Content-Type", "Aiwfe-Idempotency-Key", "Aiwfe-Validate-Only", "traceparent")
JOB_H = ("Nats-Msg-Id", "Aiwfe-Schema", "traceparent", "Content-Type")
EVENT_H = ("Aiwfe-Schema", "traceparent")
JOB_EVENT_H = ("Aiwfe-Type", "Nats-Msg-Id")
KERNEL_EVENTS: dict[str, tuple[type | None, str]] = {
    "job.failed": (ErrorInfo, "The job failed for good (final): the reason; also its dead letter's `Aiwfe-Reason`."),
    "job.cancelled": (ErrorInfo, "The job was cancelled (final)."),
    "job.retrying": (JobRetrying, "An attempt failed with a retryable error; the job runs again after its backoff."),
    "job.replayed": (JobReplayed, "Re-queued from the dead-letter stream."),
}


def _headers(names: tuple[str, ...], required: tuple[str, ...] = (), **const: str) -> dict[str, Any]:
    props = {n: dict(HEADERS[n]) for n in names}
    for key, value in const.items():
        props[key.replace("_", "-")]["const"] = value
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = list(required)
    return schema


def _event_headers(typ: str) -> dict[str, Any]:
    """Headers of a job event of type ``typ`` (its ``Nats-Msg-Id``, when set, dedupes the kernel's
    own terminal events and is not a job id)."""
    schema = _headers(JOB_EVENT_H, ("Aiwfe-Type",), Aiwfe_Type=typ)
    schema["properties"]["Nats-Msg-Id"] = {"type": "string", "description": "Dedupes a repeated write of the same event."}
    return schema


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ") or cls.__name__


def _ref(section: str, key: str) -> dict[str, str]:
    return {"$ref": f"#/{section}/{key}"}


class Parts:
    """Channels, operations, messages and schemas under subject prefix ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.channels: dict[str, Any] = {}
        self.operations: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self._payloads: list[tuple[dict[str, Any], list[type]]] = []

    def _message(self, key: str, payload: list[type], headers: dict[str, Any], content_type: str, **extra: Any) -> str:
        """Add components/messages/``key``; ``payload`` is one type, or several for a oneOf."""
        msg = {"name": key, "contentType": content_type, "headers": headers, **extra}
        self._payloads.append((msg, payload))
        self.messages[key] = msg
        return key

    def _channel(self, cid: str, address: str | None, description: str, messages: dict[str, str], **extra: Any) -> None:
        self.channels[cid] = {
            "address": address,
            "description": description,
            "messages": {name: _ref("components/messages", key) for name, key in messages.items()},
            **extra,
        }

    def _operation(self, oid: str, action: str, cid: str, names: list[str], summary: str, **extra: Any) -> None:
        self.operations[oid] = {
            "action": action,
            "channel": _ref("channels", cid),
            "summary": summary,
            "messages": [_ref(f"channels/{cid}/messages", n) for n in names],
            **extra,
        }

    def _reply(self, cid: str, key: str) -> dict[str, Any]:
        """A reply channel without an address (the requester's inbox) and the operation's ``reply``."""
        self._channel(
            f"{cid}-reply",
            None,
            "The requester's reply inbox (`_INBOX.<user>.…`, set by NATS request/reply).",
            {"reply": key},
        )
        return {"channel": _ref("channels", f"{cid}-reply"), "messages": [_ref(f"channels/{cid}-reply/messages", "reply")]}

    def _served(self, subject: str, access: str, pods: list[str], **more: Any) -> dict[str, Any]:
        return {
            "bindings": {"nats": {"queue": subject, "bindingVersion": "0.1.0"}},
            "x-aiwfe-access": access,
            "x-aiwfe-served-by": pods,
            **more,
        }

    def rpc(self, contract: type, pods: list[str], callers: list[str]) -> None:
        """A request served by ``pods`` (queue group = the subject), called by ``callers``."""
        addr, h = address_of(contract), schema_hash(contract)
        subject, cid = f"{self.prefix}.{addr}", f"rpc-{addr}"
        rt = reply_type(contract)
        req = self._message(
            f"rpc-{addr}-request",
            [contract],
            _headers(REQUEST_H, Aiwfe_Schema=h),
            JSON,
            title=contract.__name__,
            summary=_summary(contract),
            description="Pods send msgpack behind the kernel's binary call preamble (deadline, schema hash, "
            "traceparent, job id; `aiwfe.bus.codec`) instead of headers; a body without a preamble is "
            "described by these headers (JSON with `Content-Type: application/json`, answered in JSON).",
            **{"x-aiwfe-schema-hash": h},
        )
        rep = self._message(
            f"rpc-{addr}-reply",
            [rt] if rt is not None else [],
            _headers(REPLY_H),
            JSON,
            title=rt.__name__ if rt is not None else "Reply",
            summary=_summary(rt) if rt is not None else "Reply",
            description="JSON for a JSON request, else msgpack. On error the body is empty and `Aiwfe-Error` is set.",
        )
        self._channel(cid, subject, f"Request/reply `{addr}`: {_summary(contract)}", {"request": req})
        reply = self._reply(cid, rep)
        self._operation(
            cid,
            "receive",
            cid,
            ["request"],
            f"Serve {addr}",
            reply=reply,
            **self._served(subject, "pods", pods, **{"x-aiwfe-callers": callers}),
        )

    def job(self, contract: type, pods: list[str]) -> None:
        """A job kind consumed by ``pods``: its submit subject and its stream subject."""
        addr, h = address_of(contract), schema_hash(contract)
        submit, stream = f"{self.prefix}.submit.{addr}", f"{self.prefix}.jobs.{addr}"
        sub = self._message(
            f"submit-{addr}",
            [contract],
            _headers(SUBMIT_H),
            JSON,
            title=contract.__name__,
            summary=_summary(contract),
            description="The job input as JSON (`Content-Type: application/json`) or msgpack; decoded against the "
            "contract before anything is recorded or queued.",
        )
        acc = self._message(
            f"submit-{addr}-accepted",
            [SubmitAccepted],
            _headers(REPLY_H),
            JSON,
            summary="The job id (msgpack when the request was msgpack). On error `Aiwfe-Error` names the bad field.",
        )
        self._channel(f"submit-{addr}", submit, f"Submit a `{addr}` job (validated, then queued).", {"submit": sub})
        reply = self._reply(f"submit-{addr}", acc)
        self._operation(
            f"submit-{addr}",
            "receive",
            f"submit-{addr}",
            ["submit"],
            f"Accept {addr} jobs",
            reply=reply,
            **self._served(submit, "pods, publisher", pods),
        )
        queued = self._message(
            f"job-{addr}",
            [contract],
            _headers(JOB_H, ("Nats-Msg-Id",), Aiwfe_Schema=h),
            MSGPACK,
            title=contract.__name__,
            summary=_summary(contract),
            description="msgpack, or JSON with `Content-Type: application/json`.",
            **{"x-aiwfe-schema-hash": h},
        )
        self._channel(
            f"jobs-{addr}",
            stream,
            f"The durable `{addr}` jobs (JetStream work queue; one durable pull consumer per kind). Pods only: "
            f"external clients use `{submit}`.",
            {"job": queued},
        )
        self._operation(
            f"jobs-{addr}",
            "receive",
            f"jobs-{addr}",
            ["job"],
            f"Run {addr} jobs",
            **{"x-aiwfe-access": "pods", "x-aiwfe-consumed-by": pods},
        )

    def event(self, contract: type, emitters: list[str], subscribers: list[str]) -> None:
        """A bus event emitted by ``emitters`` and delivered to every pod in ``subscribers``."""
        addr, h = address_of(contract), schema_hash(contract)
        key = self._message(
            f"event-{addr}",
            [contract],
            _headers(EVENT_H, Aiwfe_Schema=h),
            MSGPACK,
            title=contract.__name__,
            summary=_summary(contract),
            **{"x-aiwfe-schema-hash": h},
        )
        self._channel(
            f"event-{addr}", f"{self.prefix}.{addr}", f"Event `{addr}` (fan-out to every subscribing pod).", {"event": key}
        )
        self._operation(
            f"event-{addr}",
            "send",
            f"event-{addr}",
            ["event"],
            f"Emit {addr}",
            **{"x-aiwfe-access": "pods", "x-aiwfe-emitted-by": emitters, "x-aiwfe-subscribers": subscribers},
        )

    def job_events(self, events: list[type], results: list[type], pods: list[str]) -> None:
        """``<prefix>.events.{job_id}``: the kernel's job events and the plugins' ``events``."""
        names = {}
        done = self._message(
            "job-event-job.done",
            results,
            _event_headers("job.done"),
            MSGPACK,
            summary="The job finished (final): its result.",
        )
        names["job.done"] = done
        for typ, (payload, summary) in KERNEL_EVENTS.items():
            names[typ] = self._message(
                f"job-event-{typ}",
                [payload] if payload else [],
                _event_headers(typ),
                MSGPACK,
                summary=summary,
            )
        for ev in events:
            addr = address_of(ev)
            names[addr] = self._message(
                f"job-event-{addr}",
                [ev],
                _event_headers(addr),
                MSGPACK,
                title=ev.__name__,
                summary=_summary(ev),
            )
        self._channel(
            "job-events",
            f"{self.prefix}.events.{{job_id}}",
            "A job's events in order (stream `<PREFIX>_EVENTS`), msgpack, told apart by `Aiwfe-Type`. Pods only: "
            f"external clients read them as JSON from `{self.prefix}.status.job`.",
            names,
            parameters={"job_id": {"description": "The job id (its `Nats-Msg-Id`)."}},
        )
        self._operation(
            "job-events",
            "send",
            "job-events",
            list(names),
            "Emit job events",
            **{"x-aiwfe-access": "pods", "x-aiwfe-emitted-by": pods},
        )

    def status(self, pods: list[str]) -> None:
        """``<prefix>.status.job``: outcome and events as JSON, served by every pod."""
        subject = f"{self.prefix}.status.job"
        req = self._message(
            "status-job-request",
            [StatusRequest],
            _headers(("Content-Type", "traceparent")),
            JSON,
            summary=_summary(StatusRequest),
        )
        rep = self._message("status-job-reply", [StatusReply], _headers(REPLY_H), JSON, summary=_summary(StatusReply))
        self._channel("status-job", subject, "A job's outcome and events as JSON; long-polls up to `wait_s`.", {"request": req})
        reply = self._reply("status-job", rep)
        self._operation(
            "status-job",
            "receive",
            "status-job",
            ["request"],
            "Answer job status",
            reply=reply,
            **self._served(subject, "pods, publisher", pods),
        )

    def components(self) -> dict[str, Any]:
        """``components``: messages (payloads filled in now), schemas, the security scheme."""
        types: list[Any] = [ErrorInfo]
        for _, payload in self._payloads:
            types.extend(payload)
        refs, schemas = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
        contracts = {t.__name__ for t in types if isinstance(t, type) and issubclass(t, Message)}
        for name, schema in schemas.items():
            # msgspec lists a contract's tag field ("type") as required, yet decoding a single
            # contract does not need it: the address is the subject.
            if name.rsplit(".", 1)[-1] in contracts and "required" in schema:
                schema["required"] = [f for f in schema["required"] if f != "type"]
                if not schema["required"]:
                    del schema["required"]
        it = iter(refs[1:])
        for msg, payload in self._payloads:
            mine = [next(it) for _ in payload]
            if len(mine) == 1:
                msg["payload"] = mine[0]
            elif mine:
                msg["payload"] = {"oneOf": mine}
        return {
            "messages": self.messages,
            "schemas": schemas,
            "securitySchemes": {
                "userPassword": {
                    "type": "userPassword",
                    "description": "Every connection authenticates. `aiwfe up` and `aiwfe k8s` render one NATS user per "
                    "pod (`pod-<name>`, allowed exactly the subjects its plugins need) and the `publisher` role "
                    "(the submit and status subjects only, replies on `_INBOX.publisher.>`). Clients give the user "
                    "and password in the URL (`nats://USER:PASSWORD@host`) or as NATS_USER/NATS_PASSWORD. Where the "
                    "server is configured so, the same users authenticate instead with a token (NATS_TOKEN), an "
                    "nkey (NATS_NKEY_SEED) or a decentralized-JWT `.creds` file (NATS_CREDS): NATS-specific "
                    "mechanisms AsyncAPI has no scheme type for.",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": "TLS with a client certificate, for a server that verifies them (`tls://` URL, "
                    "NATS_TLS_CERT/NATS_TLS_KEY, the server's CA in NATS_TLS_CA).",
                },
            },
        }
