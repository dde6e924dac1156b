"""``aiwfe k8s``: the rendered objects are valid Kubernetes and say what the manifest says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import msgspec
import pytest
import yaml

from aiwfe.kernel.errors import ConfigError
from aiwfe.kernel.manifest import Manifest, load_manifest, parse_manifest
from aiwfe.kernel.tools import k8s
from aiwfe.kernel.tools.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "manifests").glob("*.toml"))
# The oldest Kubernetes release still in upstream support when this was written, and a
# recent one: the objects must be valid on both.
K8S_VERSIONS = ("1.30.0", "1.34.0")


def _render(path: Path, image: str = k8s.DEFAULT_IMAGE) -> tuple[Manifest, str, dict[str, list[dict[str, Any]]]]:
    text = path.read_text()
    manifest = load_manifest(path)
    return manifest, text, k8s.render(manifest, text, image=image)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {d["kind"]: d for d in docs}
    assert len(out) == len(docs), "one object of each kind per pod"
    return out


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(match)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_object_validates_against_the_kubernetes_schema(path: Path, version: str) -> None:
    _, _, files = _render(path)
    for docs in files.values():
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_each_pod_gets_deployment_service_hpa_pdb_and_one_configmap_holds_the_manifest(path: Path) -> None:
    manifest, text, files = _render(path)
    assert list(files) == [f"{manifest.system.name}-manifest", f"{manifest.system.name}-nats-auth", *manifest.pods]
    (cm,) = files[k8s.configmap_name(manifest)]
    assert cm["kind"] == "ConfigMap"
    assert cm["data"]["manifest.toml"] == text
    reparsed = parse_manifest(cm["data"]["manifest.toml"], manifest.source)
    assert msgspec.structs.asdict(reparsed) == msgspec.structs.asdict(manifest)
    for pod in manifest.pods:
        kinds = _by_kind(files[pod])
        assert set(kinds) == {"Secret", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} | {
            "NetworkPolicy"
        }
        assert all(d["metadata"]["name"] == pod for k, d in kinds.items() if k != "Secret")
        assert kinds["Secret"]["metadata"]["name"] == f"{pod}-nats"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_deployment_runs_the_pod_with_probes_prestop_grace_and_resources(path: Path) -> None:
    manifest, _, files = _render(path, image="registry.example/aiwfe:1.2.3")
    for pod_name, pod in manifest.pods.items():
        kinds = _by_kind(files[pod_name])
        dep = kinds["Deployment"]
        spec = dep["spec"]["template"]["spec"]
        c = _container(dep)
        assert c["image"] == "registry.example/aiwfe:1.2.3"
        args = build_parser().parse_args(c["args"])
        assert (args.command, args.manifest, args.pod, args.ops_port) == ("run", k8s.MANIFEST_PATH, pod_name, k8s.OPS_PORT)
        mount = next(m for m in c["volumeMounts"] if m["name"] == "manifest")
        assert k8s.MANIFEST_PATH == f"{mount['mountPath']}/manifest.toml"
        vol = next(v for v in spec["volumes"] if v["name"] == "manifest")
        assert vol["configMap"]["name"] == k8s.configmap_name(manifest)

        live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
        assert live["path"] == "/health" and ready["path"] == "/ready"
        assert _port_number(c, live["port"]) == _port_number(c, ready["port"]) == k8s.OPS_PORT
        assert c["lifecycle"]["preStop"]["exec"]["command"]
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > manifest.system.drain_timeout_s + k8s.PRESTOP_SLEEP_S

        r = pod.resources
        assert c["resources"] == {
            "requests": {"cpu": r.cpu_request, "memory": r.memory_request},
            "limits": {"cpu": r.cpu_limit, "memory": r.memory_limit},
        }
        assert c["envFrom"] == [{"secretRef": {"name": f"{manifest.system.name}-services"}}]
        assert spec["securityContext"]["runAsNonRoot"] is True

        labels = dep["spec"]["template"]["metadata"]["labels"]
        for kind in ("Deployment", "PodDisruptionBudget"):
            selector = kinds[kind]["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items()
        assert kinds["Service"]["spec"]["selector"].items() <= labels.items()
        svc_ports = {p["name"]: p for p in kinds["Service"]["spec"]["ports"]}
        assert _port_number(c, svc_ports["ops"]["targetPort"]) == k8s.OPS_PORT
        assert kinds["PodDisruptionBudget"]["spec"] == {
            "maxUnavailable": 1,
            "selector": {"matchLabels": kinds["Deployment"]["spec"]["selector"]["matchLabels"]},
        }


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_hpa_scales_the_deployment_with_the_manifests_targets_and_behaviour(path: Path) -> None:
    manifest, _, files = _render(path)
    for pod_name, pod in manifest.pods.items():
        kinds = _by_kind(files[pod_name])
        hpa = kinds["HorizontalPodAutoscaler"]["spec"]
        assert "replicas" not in kinds["Deployment"]["spec"], "the HPA owns the replica count"
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": pod_name}
        a = pod.autoscaling
        if a is None:
            assert hpa["minReplicas"] == hpa["maxReplicas"] == pod.replicas
            continue
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (a.min_replicas, a.max_replicas)
        by_name = {m.get("resource", m.get("pods", {}).get("metric", {})).get("name"): m for m in hpa["metrics"]}
        assert by_name["cpu"]["resource"]["target"] == {"type": "Utilization", "averageUtilization": a.cpu_utilization_pct}
        assert by_name["memory"]["resource"]["target"] == {
            "type": "Utilization",
            "averageUtilization": a.memory_utilization_pct,
        }
        if "reasoning" in pod.plugins:
            target = by_name[k8s.LLM_METRIC]["pods"]["target"]
            expected = a.active_llm_requests if a.active_llm_requests is not None else k8s.DEFAULT_LLM_REQUESTS_PER_POD
            assert target == {"type": "AverageValue", "averageValue": str(int(expected))}
        else:
            assert k8s.LLM_METRIC not in by_name
        up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
        assert up["stabilizationWindowSeconds"] == a.scale_up_stabilization_s
        assert up["policies"] == [{"type": "Percent", "value": a.scale_up_percent, "periodSeconds": 60}]
        assert down["stabilizationWindowSeconds"] == a.scale_down_stabilization_s
        assert down["policies"] == [{"type": "Percent", "value": a.scale_down_percent, "periodSeconds": 60}]


GATEWAY_MANIFEST = """
[system]
name = "shop"
drain_timeout_s = 12.5

[pods.api]
plugins = ["gateway", "auth"]
replicas = 3

[pods.thinker]
plugins = ["reasoning"]

[pods.thinker.autoscaling]
max_replicas = 4
active_llm_requests = 2.5

[plugins.gateway]
port = "${GATEWAY_PORT:-8443}"
"""


def test_gateway_pod_exposes_its_http_port_and_fractions_become_quantities() -> None:
    manifest = parse_manifest(GATEWAY_MANIFEST, env={})
    files = k8s.render(manifest, GATEWAY_MANIFEST)
    api = _by_kind(files["api"])
    c = _container(api["Deployment"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"ops": k8s.OPS_PORT, "http": 8443}
    assert {p["name"]: p["port"] for p in api["Service"]["spec"]["ports"]} == {"http": 8443, "ops": k8s.OPS_PORT}
    assert api["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == api["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] == 3
    assert api["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 12.5 + k8s.PRESTOP_SLEEP_S
    thinker = _by_kind(files["thinker"])
    assert "http" not in {p["name"] for p in thinker["Service"]["spec"]["ports"]}
    (llm,) = [m for m in thinker["HorizontalPodAutoscaler"]["spec"]["metrics"] if m["type"] == "Pods"]
    assert llm["pods"]["target"]["averageValue"] == "2500m"
    for docs in files.values():
        for doc in docs:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)

    assert {"name": k8s.GATEWAY_HOST_VAR, "value": "0.0.0.0"} in c["env"]
    assert k8s.GATEWAY_HOST_VAR not in {e["name"] for e in _container(thinker["Deployment"])["env"]}

    default_port = parse_manifest(GATEWAY_MANIFEST.replace('port = "${GATEWAY_PORT:-8443}"', ""), env={})
    api = _by_kind(k8s.render(default_port, "")["api"])
    assert {p["name"]: p["port"] for p in api["Service"]["spec"]["ports"]}["http"] == k8s.DEFAULT_GATEWAY_PORT


def test_invalid_names_are_all_reported_with_the_fix() -> None:
    text = """
[system]
name = "My_System"
[pods.good]
plugins = ["perception"]
[pods.Bad_Pod]
plugins = ["perception"]
[pods.9lives]
plugins = ["perception"]
"""
    with pytest.raises(ConfigError) as e:
        k8s.render(parse_manifest(text, "x.toml", env={}), text)
    msg = e.value.message
    assert "'Bad_Pod'" in msg and "'9lives'" in msg and "'My_System'" in msg and "'good'" not in msg
    assert "rename [pods.Bad_Pod]" in msg and "lowercase letters" in msg


def test_bad_gateway_port_is_a_config_error() -> None:
    text = '[pods.api]\nplugins = ["gateway"]\n[plugins.gateway]\nport = "http"\n'
    with pytest.raises(ConfigError, match="port"):
        k8s.render(parse_manifest(text, env={}), text)


def test_cli_prints_a_yaml_stream_or_writes_one_file_per_pod(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "manifests" / "microservices.toml"
    assert main(["k8s", str(path), "--image", "example/aiwfe:9"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs].count("Deployment") == len(load_manifest(path).pods)
    assert {_container(d)["image"] for d in docs if d["kind"] == "Deployment"} == {"example/aiwfe:9"}

    out = tmp_path / "k8s"
    assert main(["k8s", str(path), "-o", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    pods = load_manifest(path).pods
    assert written == sorted(["aiwfe-manifest.yaml", "aiwfe-nats-auth.yaml", *(f"{pod}.yaml" for pod in pods)])
    assert [d["kind"] for d in yaml.safe_load_all((out / "reasoning.yaml").read_text())] == [
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ]
    (cm,) = yaml.safe_load_all((out / "aiwfe-manifest.yaml").read_text())
    assert cm["data"]["manifest.toml"] == path.read_text()


def test_cli_reports_a_missing_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["k8s", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read manifest" in capsys.readouterr().err


def test_hints_name_a_gateway_that_would_listen_on_loopback_only(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fixed = '[pods.api]\nplugins = ["gateway"]\n[plugins.gateway]\nhost = "127.0.0.1"\n'
    default = '[pods.api]\nplugins = ["gateway"]\n'
    from_env = '[pods.api]\nplugins = ["gateway"]\n[plugins.gateway]\nhost = "${AIWFE_GATEWAY_HOST:-127.0.0.1}"\n'
    no_gateway = '[pods.p]\nplugins = ["perception"]\n[plugins.gateway]\nhost = "127.0.0.1"\n'
    for text, expected in ((fixed, 1), (default, 1), (from_env, 0), (no_gateway, 0)):
        found = k8s.hints(parse_manifest(text, env={}), text)
        assert len(found) == expected, (text, found)
    assert k8s.GATEWAY_HOST_VAR in k8s.hints(parse_manifest(fixed, env={}), fixed)[0]
    path = tmp_path / "m.toml"
    path.write_text(fixed)
    assert main(["k8s", str(path), "-o", str(tmp_path / "out")]) == 0
    assert "warning: [plugins.gateway] host" in capsys.readouterr().err


def test_autoscaling_out_of_range_is_reported_before_a_cluster_rejects_it() -> None:
    text = """
[pods.a]
plugins = ["reasoning"]
[pods.a.autoscaling]
min_replicas = 4
max_replicas = 2
scale_down_percent = 0
active_llm_requests = 0
[pods.b]
plugins = ["perception"]
replicas = 0
"""
    with pytest.raises(ConfigError) as e:
        k8s.render(parse_manifest(text, "x.toml", env={}), text)
    msg = e.value.message
    assert "[pods.a.autoscaling]: need 1 <= min_replicas (4) <= max_replicas (2)" in msg
    assert "scale_down_percent must be above 0" in msg and "active_llm_requests must be above 0" in msg
    assert "[pods.b] replicas: need 1 <= min_replicas (0)" in msg


def test_each_pod_reads_its_own_nats_user_from_its_secret_and_the_server_gets_the_authorization() -> None:
    from aiwfe.kernel.tools.natsauth import ADMIN, PUBLISHER, permissions

    path = ROOT / "manifests" / "consolidated.toml"
    manifest, _, files = _render(path)
    (auth,) = files["aiwfe-nats-auth"]
    users = permissions(manifest)
    conf = auth["stringData"]["authorization.conf"]
    assert conf.startswith("authorization: ") and all(f'"user": "{u}"' in conf for u in users)
    passwords = {}
    for pod in manifest.pods:
        kinds = _by_kind(files[pod])
        secret = kinds["Secret"]["stringData"]
        assert secret["NATS_USER"] == f"pod-{pod}" and len(secret["NATS_PASSWORD"]) >= 40
        assert f'"password": "{secret["NATS_PASSWORD"]}"' in conf
        passwords[secret["NATS_USER"]] = secret["NATS_PASSWORD"]
        env = {e["name"]: e for e in _container(kinds["Deployment"])["env"]}
        for key in ("NATS_USER", "NATS_PASSWORD"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": f"{pod}-nats", "key": key}
    assert len(set(passwords.values())) == len(passwords)  # one password per pod
    assert auth["stringData"]["admin.user"] == ADMIN and auth["stringData"]["publisher.user"] == PUBLISHER

    # given passwords are kept, so re-rendering does not rotate credentials
    given = {**passwords, ADMIN: "a" * 43, PUBLISHER: "p" * 43}
    again = k8s.render(manifest, path.read_text(), passwords=given)
    kept = _by_kind(again["background-worker-engine"])["Secret"]["stringData"]["NATS_PASSWORD"]
    assert kept == passwords["pod-background-worker-engine"]
    assert again["aiwfe-nats-auth"][0]["stringData"]["publisher.password"] == "p" * 43


def test_network_policies_admit_only_ops_and_gateway_ports_and_egress_by_need() -> None:
    _, _, files = _render(ROOT / "manifests" / "consolidated.toml")

    def policy(pod: str) -> tuple[set[int], set[int]]:
        spec = _by_kind(files[pod])["NetworkPolicy"]["spec"]
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == pod
        (ingress,) = spec["ingress"]
        (egress,) = spec["egress"]
        assert "from" not in ingress and "to" not in egress
        return {p["port"] for p in ingress["ports"]}, {p["port"] for p in egress["ports"]}

    assert policy("unified-api-gateway") == ({8080, k8s.OPS_PORT}, {53, 4222, 5432, 6379})
    ingress, egress = policy("cognitive-processing-engine")
    assert ingress == {k8s.OPS_PORT} and {53, 4222, 5432, 6379, 6333, 443, 11434} <= egress
    assert policy("background-worker-engine") == ({k8s.OPS_PORT}, {53, 4222, 5432, 6379})  # helios: postgres, redis


def test_cli_keeps_nats_passwords_in_the_file_it_is_given(tmp_path: Path) -> None:
    path = ROOT / "manifests" / "microservices.toml"
    keep = tmp_path / "nats-passwords.json"
    for out in ("a", "b"):
        assert main(["k8s", str(path), "-o", str(tmp_path / out), "--nats-passwords", str(keep)]) == 0
    assert keep.stat().st_mode & 0o777 == 0o600
    a, b = ((tmp_path / d / "aiwfe-nats-auth.yaml").read_text() for d in ("a", "b"))
    assert a == b
