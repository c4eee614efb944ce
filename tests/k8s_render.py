"""deploy/kubernetes rendered as kubectl would apply it, and ways to read the result."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATION = ROOT / "deploy" / "kubernetes"


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The documents ``kubectl apply -k directory`` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl (with kustomize) is needed to render deploy/kubernetes")
        pytest.skip("no kubectl here to render deploy/kubernetes")
    out = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(documents: list[dict[str, Any]], kind: str, name_prefix: str) -> dict[str, Any]:
    found: dict[str, Any]
    (found,) = [
        d for d in documents if d["kind"] == kind and d["metadata"]["name"].startswith(name_prefix)
    ]
    return found


def pod_spec(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = one(documents, "Deployment", "matrix-spoa")["spec"]["template"]["spec"]
    return spec


def containers(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The router pod's init containers, then its containers."""
    spec = pod_spec(documents)
    every: list[dict[str, Any]] = [*spec.get("initContainers", []), *spec["containers"]]
    return every


def container(documents: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found: dict[str, Any]
    (found,) = [c for c in containers(documents) if c["name"] == name]
    return found


SITE = ROOT / "deploy" / "kubernetes-site"


def site_overlay(
    directory: Path, *, namespace: str | None = None, uncomment: tuple[str, ...] = ()
) -> Path:
    """deploy/kubernetes-site/kustomization.yaml edited as docs/deploy-kubernetes.md says
    (the namespace set, component lines uncommented), in ``directory``."""
    text = (SITE / "kustomization.yaml").read_text()
    if namespace is not None:
        assert "\nnamespace: chat\n" in text
        text = text.replace("\nnamespace: chat\n", f"\nnamespace: {namespace}\n")
    for entry in uncomment:
        line = f"  # - {entry}\n"
        assert line in text, entry
        text = text.replace(line, f"  - {entry}\n")
    kustomization = yaml.safe_load(text)
    # The same directories, seen from where the copy is.
    for field in ("resources", "components"):
        kustomization[field] = [
            os.path.relpath(SITE / entry, directory) for entry in kustomization.get(field) or []
        ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return directory


def overlay(directory: Path, resources: list[Path], components: tuple[Path, ...] = ()) -> Path:
    """A kustomization in ``directory`` of ``resources`` and ``components`` (paths made
    relative, as kustomize wants them)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(r, directory) for r in resources],
                "components": [os.path.relpath(c, directory) for c in components],
            }
        )
    )
    return directory
