"""deploy/kubernetes as kubectl would apply it: rendered by kustomize, checked
against the Kubernetes API schemas of a current release, and against what the
shipped haproxy.cfg and the bundled policy expect of it.

The configuration the manifests give HAProxy and the agent is run for real in
tests/integration/test_kubernetes_pod.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spoa.demo.stack import env_name
from spoa.policy import load_policy
from tests.k8s_render import (
    KUSTOMIZATION,
    container,
    containers,
    kustomize,
    one,
    overlay,
    pod_spec,
)

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = (ROOT / "haproxy" / "haproxy.cfg").read_text()


def rendered_with_monitoring(tmp_path: Path) -> list[dict[str, Any]]:
    return kustomize(
        overlay(tmp_path / "overlay", [KUSTOMIZATION], (KUSTOMIZATION / "monitoring",))
    )


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    return kustomize(KUSTOMIZATION)


def test_every_manifest_validates_strictly_against_current_kubernetes(
    documents: list[dict[str, Any]], tmp_path: Path
) -> None:
    version = kubernetes_validate.latest_version()
    assert tuple(int(x) for x in version.split(".")[:2]) >= (1, 34)
    kinds = set()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)
        kinds.add(document["kind"])
    assert {"Deployment", "PodDisruptionBudget", "Service", "ConfigMap", "Ingress"} <= kinds
    # The optional component adds only the Prometheus Operator's PodMonitor and
    # PrometheusRule, custom resources the API schemas do not describe: checked
    # below and in tests/test_alerts.py instead.
    extra = [d for d in rendered_with_monitoring(tmp_path) if d not in documents]
    assert sorted(d["kind"] for d in extra) == ["PodMonitor", "PrometheusRule"]


def test_the_schema_check_catches_a_typo(documents: list[dict[str, Any]]) -> None:
    deployment = one(documents, "Deployment", "matrix-spoa")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_the_pod_monitor_scrapes_ports_the_pod_has(
    documents: list[dict[str, Any]], tmp_path: Path
) -> None:
    monitor = one(rendered_with_monitoring(tmp_path), "PodMonitor", "matrix-spoa")
    labels = one(documents, "Deployment", "matrix-spoa")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for c in pod_spec(documents)["containers"] for p in c.get("ports", [])}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_every_class_of_the_bundled_policy_has_a_headless_service_haproxy_finds(
    documents: list[dict[str, Any]],
) -> None:
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    for worker_class in load_policy(str(ROOT / "policies" / "synapse-workers.yaml")).classes:
        name = "synapse-" + worker_class.replace("_", "-")
        service = services[name]
        assert service["metadata"]["namespace"] == "matrix"
        assert service["spec"]["selector"] == {"synapse-worker-class": worker_class}
        if worker_class == "main":
            # Its replication listener too, for the workers (instance_map).
            assert [p["name"] for p in service["spec"]["ports"]] == ["http", "replication"]
            continue
        assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
        assert service["spec"]["clusterIP"] == "None"
        # The SRV name Kubernetes publishes is haproxy.cfg's default for the
        # class, in the namespace the pod says it is in.
        srv = f"_http._tcp.{name}.${{SYNAPSE_NAMESPACE}}.svc.${{SYNAPSE_CLUSTER_DOMAIN}}"
        assert f'presetenv {env_name(worker_class)} "{srv}"' in HAPROXY_CFG, worker_class
    # The pod's own namespace, from the downward API: main and the classes follow it.
    (variable,) = [e for e in container(documents, "haproxy")["env"] if "SYNAPSE" in e["name"]]
    assert variable == {
        "name": "SYNAPSE_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }


def test_haproxy_gets_every_file_its_configuration_reads(documents: list[dict[str, Any]]) -> None:
    haproxy = container(documents, "haproxy")
    env = {e["name"]: e["value"] for e in haproxy["env"] if "value" in e}
    (mount,) = [m for m in haproxy["volumeMounts"] if m["name"] == "haproxy"]
    (volume,) = [v for v in pod_spec(documents)["volumes"] if v["name"] == "haproxy"]
    files: dict[str, str] = {}
    for source in volume["projected"]["sources"]:
        configmap = one(documents, "ConfigMap", source["configMap"]["name"])
        # A hashed name: an edit of HAProxy's files rolls the Deployment.
        assert re.fullmatch(r"haproxy-config-[a-z0-9]{10}", configmap["metadata"]["name"])
        for item in source["configMap"]["items"]:
            files[f"{mount['mountPath']}/{item['path']}"] = configmap["data"][item["key"]]
    assert haproxy["args"][-1] in files
    assert files[haproxy["args"][-1]] == HAPROXY_CFG
    referenced = re.findall(r'"\$\{SPOA_CONF_DIR-/etc/haproxy\}(/[^"]+)"', HAPROXY_CFG)
    for path in referenced:
        assert f"{env['SPOA_CONF_DIR']}{path}" in files, path
        shipped = (ROOT / "haproxy" / path.lstrip("/")).read_bytes().decode()  # CRLF kept
        assert files[f"{env['SPOA_CONF_DIR']}{path}"] == shipped
    spoe = (ROOT / "haproxy" / "spoe-router.conf").read_text()
    assert files[f"{env['SPOA_CONF_DIR']}/spoe-router.conf"] == spoe


def test_the_fallback_map_is_made_before_haproxy_starts_and_pushed_live_after(
    documents: list[dict[str, Any]],
) -> None:
    """The init container writes the map HAProxy loads; the agent rewrites it and pushes
    each policy through HAProxy's runtime API, a socket in the same shared volume."""
    spec = pod_spec(documents)
    haproxy, agent = container(documents, "haproxy"), container(documents, "agent")
    (init,) = spec["initContainers"]
    env = {e["name"]: e["value"] for e in haproxy["env"] if "value" in e}
    written = env["SPOA_FALLBACK_MAP"]
    assert init["args"][:2] == ["fallback", agent["args"][agent["args"].index("--policy") + 1]]
    assert init["args"][init["args"].index("-o") + 1] == written
    assert agent["args"][agent["args"].index("--fallback-map") + 1] == written
    socket = agent["args"][agent["args"].index("--haproxy-socket") + 1]
    assert env["SPOA_ADMIN_SOCKET"] == socket and env["SPOA_ADMIN_SOCKET_MODE"] == "660"
    for c in (init, haproxy, agent):
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "fallback"]
        assert mount["mountPath"] == str(Path(written).parent) == str(Path(socket).parent)
        assert not mount.get("readOnly")
    (volume,) = [v for v in spec["volumes"] if v["name"] == "fallback"]
    assert "emptyDir" in volume
    # The agent is in HAProxy's group (99), which owns the socket.
    assert haproxy["securityContext"]["runAsGroup"] == 99
    assert 99 in spec["securityContext"]["supplementalGroups"]


def test_the_policy_is_a_directory_mount_updated_in_place(documents: list[dict[str, Any]]) -> None:
    agent = container(documents, "agent")
    policy = agent["args"][agent["args"].index("--policy") + 1]
    (mount,) = [m for m in agent["volumeMounts"] if m["name"] == "policy"]
    assert "subPath" not in mount  # a subPath mount never sees ConfigMap updates
    assert policy == f"{mount['mountPath']}/policy.yaml"
    (volume,) = [v for v in pod_spec(documents)["volumes"] if v["name"] == "policy"]
    configmap = one(documents, "ConfigMap", volume["configMap"]["name"])
    # A fixed name, so an edit updates the mounted files and restarts nothing.
    assert configmap["metadata"]["name"] == "spoa-policy"
    text = configmap["data"]["policy.yaml"]
    assert text == (KUSTOMIZATION / "policy" / "policy.yaml").read_text()
    assert yaml.safe_load(text)["extends"] == "synapse-workers"
    # HAProxy asks the agent where haproxy.cfg says it listens.
    assert agent["args"][agent["args"].index("--listen") + 1] == "127.0.0.1:12345"
    assert '"${SPOA_AGENT-127.0.0.1:12345}"' in HAPROXY_CFG


def test_the_pods_run_unprivileged_with_probes_and_limits(documents: list[dict[str, Any]]) -> None:
    deployment = one(documents, "Deployment", "matrix-spoa")
    spec = pod_spec(documents)
    assert deployment["spec"]["replicas"] == 2
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    for c in containers(documents):
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert isinstance(security["runAsUser"], int) and security["runAsUser"] > 0
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert "memory" in c["resources"]["limits"]
        if c not in spec.get("initContainers", []):
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    haproxy = container(documents, "haproxy")
    # HAProxy's probes are its own answer, not a request to Synapse.
    assert haproxy["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "stats"}
    env = {e["name"]: e["value"] for e in haproxy["env"] if "value" in e}
    assert env["SPOA_STATS_BIND"] == ":8404"  # reachable by the kubelet
    budget = one(documents, "PodDisruptionBudget", "matrix-spoa")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]


def test_the_ingress_sends_matrix_traffic_to_haproxy(documents: list[dict[str, Any]]) -> None:
    ingress = one(documents, "Ingress", "matrix-spoa")
    service = one(documents, "Service", "matrix-spoa")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "matrix-spoa"}
    paths = {
        p["path"]: p["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }
    assert {"/_matrix", "/_synapse/client"} <= set(paths)
    assert all(b == {"name": "matrix-spoa", "port": {"name": "http"}} for b in paths.values())
    assert not any(p.startswith("/_synapse/admin") for p in paths)
