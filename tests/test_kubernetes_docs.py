"""docs/deploy-kubernetes.md's steps, run as written where no cluster is needed.

Each command of "From zero to routed traffic" is run: ``kubectl create``
with ``--dry-run=client`` (its object validated), ``kubectl apply -k DIR`` as
``kubectl kustomize DIR`` (every object validated), ``spoa check`` as is; the
commands that need a cluster (rollout, port-forward, logs) are checked to name
objects the manifests make. The docs' edits (MAS uncommented, another
namespace) are rendered too. The image build needs a registry: not run.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s_render import kustomize, one, site_overlay

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
STEPS = DOC[DOC.index("## From zero to routed traffic") : DOC.index("## Probes")]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", STEPS, re.S)


def commands() -> list[list[str]]:
    found = []
    for block in blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                found.append(shlex.split(line))
    return found


def validate(documents: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def expanded(words: list[str]) -> list[str]:
    """Globs as the shell expands them."""
    return [
        found
        for word in words
        for found in (
            [str(p.relative_to(ROOT)) for p in sorted(ROOT.glob(word))] if "*" in word else [word]
        )
    ]


def run(argv: list[str], cwd: Path) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False, timeout=120)
    assert out.returncode == 0, (argv, out.stdout, out.stderr)
    return out.stdout


def test_the_steps_run_as_written(tmp_path: Path) -> None:
    # Step 3's files: the docs' homeserver.yaml, and a signing key.
    (homeserver,) = blocks("yaml")
    assert yaml.safe_load(homeserver)["signing_key_path"] == "/etc/synapse/signing.key"
    (tmp_path / "homeserver.yaml").write_text(homeserver)
    (tmp_path / "signing.key").write_text(
        "ed25519 a_test AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
    )
    namespace = None
    rendered: list[dict[str, Any]] = []
    seen = set()
    for argv in commands():
        seen.add(argv[0])
        if argv[0] == "docker":
            continue  # needs a registry
        if argv[0] == "spoa":
            run([str(ROOT / ".venv" / "bin" / "spoa"), *expanded(argv[1:])], ROOT)
            continue
        assert argv[0] == "kubectl", argv
        if argv[1:3] == ["create", "namespace"]:
            namespace = argv[3]
            created = run([*argv, "--dry-run=client", "-o", "yaml"], tmp_path)
            validate([yaml.safe_load(created)])
        elif "create" in argv:
            assert argv[1:3] == ["-n", namespace]
            secret = yaml.safe_load(run([*argv, "--dry-run=client", "-o", "yaml"], tmp_path))
            validate([secret])
            assert set(secret["data"]) == {"homeserver.yaml", "signing.key"}
        elif argv[1:3] == ["apply", "-k"]:
            rendered = kustomize(ROOT / argv[3])
            validate(rendered)
            assert {d["metadata"].get("namespace", namespace) for d in rendered} == {namespace}
            # Every process reads the Secret step 3 made.
            secrets = {
                s["secret"]["name"]
                for d in rendered
                if d["kind"] == "Deployment"
                for v in d["spec"]["template"]["spec"].get("volumes", [])
                for s in v.get("projected", {}).get("sources", [])
                if "secret" in s
            }
            assert secrets == {"synapse-homeserver"}
        else:
            # A cluster's commands: they name what was applied.
            assert argv[1:3] == ["-n", namespace] and rendered, argv
            (target,) = [a for a in argv if "/" in a]
            kind, _, name = target.partition("/")
            one(rendered, {"deploy": "Deployment", "svc": "Service"}[kind], name)
            if argv[3] == "port-forward":
                ports = {p["port"] for p in one(rendered, "Service", name)["spec"]["ports"]}
                assert {int(p) for p in argv[argv.index(target) + 1 :]} <= ports
    assert seen == {"docker", "kubectl", "spoa"}


def test_every_directory_the_page_applies_renders_and_validates() -> None:
    directories = set(re.findall(r"kubectl apply -k (\S+?)`?\s", DOC))
    assert {"deploy/kubernetes", "deploy/kubernetes-site"} <= directories
    for directory in directories:
        validate(kustomize(ROOT / directory))


@pytest.mark.parametrize("variant", ["mas", "namespace"])
def test_the_edits_of_step_2(variant: str, tmp_path: Path) -> None:
    assert "uncomment `- ../kubernetes/mas`" in STEPS and "`namespace:`" in STEPS
    if variant == "mas":
        overlay = site_overlay(tmp_path, uncomment=("../kubernetes/mas",))
    else:
        overlay = site_overlay(tmp_path, namespace="synapse-prod")
    documents = kustomize(overlay)
    validate(documents)
    if variant == "mas":
        one(documents, "Service", "matrix-authentication-service")
        policy = one(documents, "ConfigMap", "spoa-policy")["data"]["policy.yaml"]
        assert "extends: synapse-workers-mas" in policy
        # The MAS check of step 4.
        run(
            [
                str(ROOT / ".venv" / "bin" / "spoa"),
                "check",
                "deploy/kubernetes/mas/policy.yaml",
                "--synapse",
                "deploy/synapse/homeserver-workers.yaml",
                *expanded(["deploy/synapse/workers/*.yaml"]),
                "--not-synapse",
                "mas",
            ],
            ROOT,
        )
    else:
        assert {d["metadata"].get("namespace") for d in documents} == {None, "synapse-prod"}
