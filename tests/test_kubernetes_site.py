"""deploy/kubernetes-site, deploy/kubernetes/mas and deploy/synapse as an operator renders them.

Each variant of docs/deploy-kubernetes.md (the routers alone, with MAS, a site
in a namespace of its own with Synapse's workers) rendered by kustomize and
validated strictly; the Synapse base checked against the bundled policy and
the worker files it is made from. The pod of a site in namespace chat, with
MAS, is run in tests/integration/test_kubernetes_pod.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from spoa import kube_synapse
from spoa.policy import Request, load_policy
from spoa.synapsecfg import check_synapse, load_synapse
from tests.k8s_render import KUSTOMIZATION, container, kustomize, one, overlay, site_overlay

ROOT = Path(__file__).resolve().parent.parent
SYNAPSE = ROOT / "deploy" / "synapse"
WORKER_FILES = sorted((SYNAPSE / "workers").glob("*.yaml"))


def validate(documents: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def plain_with_mas(directory: Path) -> list[dict[str, Any]]:
    """deploy/kubernetes with "components: [mas]", as the docs' MAS step says."""
    return kustomize(overlay(directory, [KUSTOMIZATION], (KUSTOMIZATION / "mas",)))


def namespaces(documents: list[dict[str, Any]]) -> set[str]:
    found = set()
    for d in documents:
        found.add(d["metadata"]["name"] if d["kind"] == "Namespace" else d["metadata"]["namespace"])
    return found


@pytest.fixture(scope="module")
def site() -> list[dict[str, Any]]:
    return kustomize(ROOT / "deploy" / "kubernetes-site")


def test_the_site_as_shipped_validates_and_lives_in_namespace_chat(
    site: list[dict[str, Any]],
) -> None:
    validate(site)
    assert namespaces(site) == {"chat"}
    # The image of the overlay, for the agent and the map it makes first.
    for name in ("agent", "fallback-map"):
        assert container(site, name)["image"] == "registry.example.org/matrix-spoa:0.1.0"
    assert container(site, "haproxy")["image"] == "haproxy:3.2.0"
    # The routers' Services and Synapse's processes side by side.
    kinds = {(d["kind"], d["metadata"]["name"]) for d in site}
    assert {("Deployment", "matrix-spoa"), ("Deployment", "synapse-main")} <= kinds
    assert ("Service", "synapse-synchrotron") in kinds


def test_the_namespace_is_set_in_one_place(tmp_path: Path) -> None:
    documents = kustomize(site_overlay(tmp_path / "site", namespace="team-a"))
    validate(documents)
    assert namespaces(documents) == {"team-a"}
    # Nothing of the manifests names a namespace: HAProxy gets the pod's own.
    text = yaml.safe_dump_all(documents)
    assert "matrix.svc" not in text and "chat" not in text
    env = container(documents, "haproxy")["env"]
    assert {
        "name": "SYNAPSE_NAMESPACE",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    } in env


def test_mas_as_a_component_of_the_routers_and_of_a_site(tmp_path: Path) -> None:
    for documents in (
        plain_with_mas(tmp_path / "plain"),
        kustomize(site_overlay(tmp_path / "site", uncomment=("../kubernetes/mas",))),
    ):
        validate(documents)
        service = one(documents, "Service", "matrix-authentication-service")
        assert service["spec"]["clusterIP"] == "None"
        assert [p["name"] for p in service["spec"]["ports"]] == ["http"]
        # The SRV name of this Service is be_mas's default in haproxy.cfg.
        cfg = (ROOT / "haproxy" / "haproxy.cfg").read_text()
        assert (
            'presetenv SYNAPSE_MAS "_http._tcp.matrix-authentication-service'
            '.${SYNAPSE_NAMESPACE}.svc.${SYNAPSE_CLUSTER_DOMAIN}"'
        ) in cfg
        # The agent's policy is the MAS one, and routes login to MAS.
        policy_map = one(documents, "ConfigMap", "spoa-policy")["data"]
        (tmp_path / "policy.yaml").write_text(policy_map["policy.yaml"])
        policy = load_policy(str(tmp_path / "policy.yaml"))
        assert "mas" in policy.classes
        assert policy.decide(Request("POST", "/_matrix/client/v3/login")).worker_class == "mas"


def test_the_synapse_base_is_current_with_its_worker_files() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "spoa.kube_synapse", str(SYNAPSE)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    assert out == (SYNAPSE / "kubernetes.yaml").read_text(), (
        "deploy/synapse/kubernetes.yaml is stale: "
        "python -m spoa.kube_synapse deploy/synapse > deploy/synapse/kubernetes.yaml"
    )


def test_the_synapse_base_runs_every_worker_file_with_the_labels_the_services_select(
    site: list[dict[str, Any]],
) -> None:
    configmap = one(site, "ConfigMap", "synapse-workers")["data"]
    for path in [SYNAPSE / "homeserver-workers.yaml", SYNAPSE / "log.yaml", *WORKER_FILES]:
        assert configmap[path.name] == path.read_text(), path.name
    deployments = {
        d["metadata"]["name"]: d
        for d in site
        if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("synapse-")
    }
    assert len(deployments) == len(WORKER_FILES) + 1
    for path in WORKER_FILES:
        name = yaml.safe_load(path.read_text())["worker_name"]
        pod = deployments[kube_synapse.dns_name(name)]["spec"]["template"]
        assert pod["metadata"]["labels"]["synapse-worker-class"] == name.rsplit("-", 1)[0]
        (synapse,) = pod["spec"]["containers"]
        assert synapse["args"][-1] == f"/etc/synapse/workers/{path.name}"
        # The projected volume holds exactly the files the arguments name.
        sources = pod["spec"]["volumes"][0]["projected"]["sources"]
        paths = {i["path"] for source in sources for i in next(iter(source.values()))["items"]}
        for config in synapse["args"][1::2]:
            assert config.removeprefix("/etc/synapse/") in paths
        assert synapse["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    # Every class Service of the routers selects at least one Synapse pod.
    for service in site:
        selector = service.get("spec", {}).get("selector", {})
        if service["kind"] == "Service" and "synapse-worker-class" in selector:
            labels = [d["spec"]["template"]["metadata"]["labels"] for d in deployments.values()]
            assert any(selector.items() <= la.items() for la in labels), service["metadata"]


def test_every_instance_of_instance_map_is_reachable_by_its_host_name(
    site: list[dict[str, Any]],
) -> None:
    instances = yaml.safe_load((SYNAPSE / "homeserver-workers.yaml").read_text())["instance_map"]
    services = {d["metadata"]["name"]: d for d in site if d["kind"] == "Service"}
    pods = {
        d["metadata"]["labels"]["synapse-process"]: d["spec"]["template"]
        for d in site
        if d["kind"] == "Deployment" and "synapse-process" in d["metadata"]["labels"]
    }
    for name, where in instances.items():
        service = services[where["host"]]
        port = next(p for p in service["spec"]["ports"] if p["port"] == where["port"])
        labels = pods[name]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
        (synapse,) = pods[name]["spec"]["containers"]
        assert port["targetPort"] in {p["name"] for p in synapse["ports"]} | {where["port"]}
    assert one(site, "Service", "redis")["spec"]["ports"][0]["port"] == 6379


def test_spoa_check_synapse_passes_on_the_files_of_the_base() -> None:
    policy = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    deployment = load_synapse(str(SYNAPSE / "homeserver-workers.yaml"), map(str, WORKER_FILES))
    findings = check_synapse(policy, "policies/synapse-workers.yaml", deployment, [])
    assert not [f for f in findings if f.level.name == "ERROR"], findings


def test_the_media_worker_keeps_its_media_on_the_claim(site: list[dict[str, Any]]) -> None:
    media = one(site, "Deployment", "synapse-media-repository-1")["spec"]
    config = yaml.safe_load((SYNAPSE / "workers" / "media_repository-1.yaml").read_text())
    (synapse,) = media["template"]["spec"]["containers"]
    mount = next(m for m in synapse["volumeMounts"] if m["name"] == "media")
    assert mount["mountPath"] == config["media_store_path"]
    assert media["strategy"] == {"type": "Recreate"}
    one(site, "PersistentVolumeClaim", "synapse-media")


def test_the_synapse_image_is_the_version_the_tests_run() -> None:
    kustomization = yaml.safe_load((SYNAPSE / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "synapse"]
    (version,) = re.findall(r"^SYNAPSE_VERSION=(\S+)$", (ROOT / "dev.sh").read_text(), re.M)
    assert image == {
        "name": "synapse",
        "newName": "ghcr.io/element-hq/synapse",
        "newTag": f"v{version}",
    }


def spoa_check_rendered(
    documents: list[dict[str, Any]], directory: Path, policy: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    """spoa check --synapse on the files the rendered Deployments give their processes
    (the ConfigMap's; the site's Secret holds no routing setting)."""
    data = one(documents, "ConfigMap", "synapse-workers")["data"]
    for key, text in data.items():
        (directory / key).write_text(text)
    main_files, worker_files = [], []
    for d in documents:
        labels = d["metadata"].get("labels", {})
        if d["kind"] != "Deployment" or "synapse-process" not in labels:
            continue
        (synapse,) = d["spec"]["template"]["spec"]["containers"]
        files = [str(directory / Path(a).name) for a in synapse["args"][1::2]]
        files = [f for f in files if Path(f).name in data]
        if labels["synapse-process"] == "main":
            main_files = files
        else:
            worker_files.append(files[-1])
    return subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "spoa"),
            *("check", policy, *flags),
            *("--synapse", *main_files, *sorted(worker_files)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_spoa_check_synapse_on_what_the_site_runs(
    site: list[dict[str, Any]], tmp_path: Path
) -> None:
    policy = str(ROOT / "deploy" / "kubernetes" / "policy" / "policy.yaml")
    out = spoa_check_rendered(site, tmp_path, policy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok: Synapse's 20 processes serve every class" in out.stdout


def test_media_on_the_main_process_as_a_component(tmp_path: Path) -> None:
    site = ROOT / "deploy" / "kubernetes-site"
    documents = kustomize(overlay(tmp_path / "overlay", [site], (SYNAPSE / "media-on-main",)))
    validate(documents)
    names = {(d["kind"], d["metadata"]["name"]) for d in documents}
    assert ("Deployment", "synapse-media-repository-1") not in names
    main = one(documents, "Deployment", "synapse-main")["spec"]
    (synapse,) = main["template"]["spec"]["containers"]
    assert synapse["args"][-2:] == ["-c", "/etc/synapse/media-on-main.yaml"]
    assert {"name": "media", "mountPath": "/media"} in synapse["volumeMounts"]
    assert main["strategy"] == {"type": "Recreate"}
    env = container(documents, "haproxy")["env"]
    assert {"name": "SYNAPSE_MAIN_SERVES_MEDIA", "value": "1"} in env
    policy = str(ROOT / "deploy" / "kubernetes" / "policy" / "policy.yaml")
    checked = spoa_check_rendered(documents, tmp_path, policy, "--main-serves-media")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "the main process serves its media" in checked.stdout
    # Without HAProxy's main backup the check says media would have nowhere to go.
    assert spoa_check_rendered(documents, tmp_path, policy).returncode == 1
