"""The AsyncAPI document (aiwfe.kernel.tools.asyncapi): its content per manifest, and its
validity under the official parser (``@asyncapi/parser``, run by node from tests/asyncapi/)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from aiwfe.kernel.contract import address_of, reply_type
from aiwfe.kernel.manifest import load_manifest, parse_manifest
from aiwfe.kernel.tools.asyncapi import for_manifest, for_pods, publishers
from aiwfe.kernel.tools.cli import main
from aiwfe.kernel.tools.natsauth import Permissions
from aiwfe.plugins.auth.contract import TokenRevoked
from aiwfe.plugins.helios.contract import Ask, Perceived, Synthesis
from aiwfe.plugins.memory.contract import Recall, RecallResult

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "manifests").glob("*.toml"))
VALIDATOR = ROOT / "tests" / "asyncapi"


def _schema(doc: dict[str, Any], ref: dict[str, str]) -> dict[str, Any]:
    name = ref["$ref"].removeprefix("#/components/schemas/")
    return doc["components"]["schemas"][name]  # type: ignore[no-any-return]


def _message(doc: dict[str, Any], channel: str, name: str) -> dict[str, Any]:
    ref = doc["channels"][channel]["messages"][name]["$ref"]
    return doc["components"]["messages"][ref.rsplit("/", 1)[1]]  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_every_subject_of_a_shipped_manifest_is_described(path: Path) -> None:
    doc = for_manifest(load_manifest(path, env={}))
    assert doc["asyncapi"] == "3.0.0"
    channels, ops = doc["channels"], doc["operations"]
    rpc = channels["rpc-memory.recall"]
    assert rpc["address"] == "aiwfe.memory.recall"
    op = ops["rpc-memory.recall"]
    assert op["action"] == "receive" and op["bindings"]["nats"]["queue"] == "aiwfe.memory.recall"
    assert op["reply"]["channel"] == {"$ref": "#/channels/rpc-memory.recall-reply"}
    assert channels["rpc-memory.recall-reply"]["address"] is None
    reply = _message(doc, "rpc-memory.recall-reply", "reply")
    assert "Aiwfe-Error" in reply["headers"]["properties"]
    assert _schema(doc, reply["payload"])["title"] == "RecallResult"
    request = _message(doc, "rpc-memory.recall", "request")
    headers = request["headers"]["properties"]
    assert {"traceparent", "Aiwfe-Deadline-Ms", "Aiwfe-Schema", "Content-Type"} <= set(headers)
    assert headers["Aiwfe-Schema"]["const"] == request["x-aiwfe-schema-hash"]
    # every request a pod serves, every job kind (submit + stream), the bus event, status
    for addr in ("auth.login", "auth.verify", "memory.recall", "perception.perceive", "reasoning.reason"):
        assert channels[f"rpc-{addr}"]["address"] == f"aiwfe.{addr}"
    assert channels["submit-helios.ask"]["address"] == "aiwfe.submit.helios.ask"
    assert ops["submit-helios.ask"]["x-aiwfe-access"] == "pods, publisher"
    accepted = _message(doc, "submit-helios.ask-reply", "reply")
    assert _schema(doc, accepted["payload"])["required"] == ["job_id"]
    assert "Aiwfe-Idempotency-Key" in _message(doc, "submit-helios.ask", "submit")["headers"]["properties"]
    assert channels["jobs-helios.ask"]["address"] == "aiwfe.jobs.helios.ask"
    assert ops["jobs-helios.ask"]["x-aiwfe-access"] == "pods"
    # who may publish, from the authorization `aiwfe up` / `aiwfe k8s` render (natsauth)
    assert "publisher" in ops["submit-helios.ask"]["x-aiwfe-publishers"]
    assert "publisher" in ops["status-job"]["x-aiwfe-publishers"]
    for oid in ("rpc-memory.recall", "jobs-helios.ask", "job-events", "event-auth.revoked"):
        assert "publisher" not in ops[oid]["x-aiwfe-publishers"], oid
        assert any(u.startswith("pod-") for u in ops[oid]["x-aiwfe-publishers"]), oid
    assert ops["event-auth.revoked"]["action"] == "send"
    events = channels["job-events"]
    assert events["address"] == "aiwfe.events.{job_id}" and "job_id" in events["parameters"]
    assert {"job.done", "job.failed", "job.cancelled", "helios.perceived", "reasoning.answer_streamed"} <= set(events["messages"])
    assert _schema(doc, _message(doc, "job-events", "job.done")["payload"])["title"] == "Synthesis"
    status = _schema(doc, _message(doc, "status-job-reply", "reply")["payload"])
    assert set(status["properties"]) == {"job_id", "status", "result", "error", "events", "last_seq", "final"}
    assert doc["components"]["securitySchemes"]["userPassword"]["type"] == "userPassword"
    assert doc["components"]["securitySchemes"]["clientCertificate"]["type"] == "X509"
    assert all(s["security"] for s in doc["servers"].values())


def test_payload_schemas_are_the_contracts_own() -> None:
    doc = for_manifest(load_manifest(ROOT / "manifests" / "monolith.toml", env={}))
    for contract, message in (
        (Recall, "rpc-memory.recall-request"),
        (Ask, "submit-helios.ask"),
        (TokenRevoked, "event-auth.revoked"),
    ):
        schema = _schema(doc, doc["components"]["messages"][message]["payload"])
        fields = set(contract.__struct_fields__)
        assert set(schema["properties"]) == fields | {"type"}
        # the tag is optional on the wire (the subject names the contract), the defaults are optional
        assert set(schema.get("required", ())) == {f.name for f in msgspec.structs.fields(contract) if f.required}
        assert schema["properties"]["type"] == {"enum": [address_of(contract)]}
    for contract in (Recall, Ask):
        rt = reply_type(contract)
        assert rt in (RecallResult, Synthesis)
    assert "helios.perceived" in doc["channels"]["job-events"]["messages"]
    assert address_of(Perceived) == "helios.perceived"


def test_servers_name_hosts_and_never_credentials() -> None:
    m = parse_manifest(
        '[system]\nnats_url = "nats://pod:s3cret@n1.example:4222, tls://n2.example:4443"\n[pods.a]\nplugins = ["memory"]\n',
        env={},
    )
    doc = for_manifest(m)
    text = json.dumps(doc)
    assert "s3cret" not in text
    hosts = sorted(s["host"] for s in doc["servers"].values())
    assert hosts == ["n1.example:4222", "n2.example:4443"]
    assert "TLS" in doc["servers"]["nats1"]["description"]


def test_a_running_systems_document_leaves_out_what_it_cannot_load() -> None:
    doc = for_pods({"api": ["gateway", "auth"], "odd": ["no.such.module:Plugin"]}, prefix="p1", name="sys")
    assert doc["channels"]["rpc-auth.verify"]["address"] == "p1.auth.verify"
    assert doc["operations"]["rpc-auth.verify"]["x-aiwfe-served-by"] == ["api"]
    assert "no.such.module" in doc["info"]["description"]
    assert doc["operations"]["rpc-auth.verify"]["x-aiwfe-publishers"] == ["admin", "pod-api"]


def test_publishers_follow_nats_subject_wildcards() -> None:
    users = {
        "a": Permissions(publish=("p.jobs.*", "p.x.>"), subscribe=()),
        "b": Permissions(publish=("p.>",), subscribe=(), publish_deny=("p.x.>",)),
    }
    assert publishers(users, "p.jobs.k") == ["a", "b"]
    assert publishers(users, "p.jobs.k.more") == ["b"]
    assert publishers(users, "p.x.y.z") == ["a"]
    assert publishers(users, "p.x") == ["b"]
    assert publishers(users, "q.jobs.k") == []


def test_cli_writes_the_document(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "asyncapi.json"
    assert main(["asyncapi", str(ROOT / "manifests" / "consolidated.toml"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["operations"]["jobs-helios.ask"]["x-aiwfe-consumed-by"] == [
        "background-worker-engine",
        "cognitive-processing-engine",
    ]
    as_yaml = tmp_path / "asyncapi.yaml"
    assert main(["asyncapi", str(ROOT / "manifests" / "consolidated.toml"), "-o", str(as_yaml)]) == 0
    assert yaml.safe_load(as_yaml.read_text()) == doc
    assert main(["asyncapi", str(ROOT / "manifests" / "monolith.toml")]) == 0
    assert json.loads(capsys.readouterr().out)["asyncapi"] == "3.0.0"
    bad = tmp_path / "bad.toml"
    bad.write_text('[pods.a]\nplugins = ["nosuch"]\n')
    assert main(["asyncapi", str(bad)]) == 2
    assert "unknown plugin 'nosuch'" in capsys.readouterr().err


def test_the_official_parser_accepts_every_shipped_manifests_document(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AsyncAPI documents cannot be checked with @asyncapi/parser")
    if not (VALIDATOR / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.skip("tests/asyncapi/node_modules is missing: run `npm ci --prefix tests/asyncapi` (.ci/run does)")
    files = []
    for path in MANIFESTS:
        out = tmp_path / f"{path.stem}.json"
        out.write_text(json.dumps(for_manifest(load_manifest(path, env={}))))
        files.append(str(out))
    done = subprocess.run([node, "validate.mjs", *files], cwd=VALIDATOR, capture_output=True, text=True, timeout=90)
    report = json.loads(done.stdout)["files"]
    for name, result in report.items():
        assert result["parsed"] and result["errors"] == [], (name, result["errors"])
        for w in result["warnings"]:
            print(f"asyncapi warning in {Path(name).stem}: {w['code']} at {w['path']}: {w['message']}")
    assert done.returncode == 0, done.stderr
