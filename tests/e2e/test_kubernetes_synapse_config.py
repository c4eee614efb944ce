"""What deploy/synapse's Deployments give each process, read by Synapse itself.

Every process of the Kubernetes base reads the site's homeserver.yaml (the
example of docs/deploy-kubernetes.md), then homeserver-workers.yaml, then its
worker file. Synapse's own configuration loader (``python -m synapse.config``)
must accept each such set, with and without the docs' MAS section, and with
the media on main (deploy/synapse/media-on-main), and see the worker it names.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.synapse import SYNAPSE_PYTHON
from tests.k8s_render import kustomize, overlay

# Synapse's configuration only, no HAProxy: once, not again per HAProxy version.
pytestmark = [pytest.mark.e2e, pytest.mark.haproxy_free]

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE = ROOT / "deploy" / "synapse"
DOC = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
MEDIA_ON_MAIN = SYNAPSE / "media-on-main" / "media-on-main.yaml"


def rendered(variant: str, directory: Path) -> list[dict[str, Any]]:
    """The Deployments of deploy/kubernetes-site, with the media component if asked."""
    components = (SYNAPSE / "media-on-main",) if variant == "media-on-main" else ()
    site = overlay(directory, [ROOT / "deploy" / "kubernetes-site"], components)
    return [d for d in kustomize(site) if d["kind"] == "Deployment"]


def site_files(directory: Path, mas: bool) -> None:
    """/etc/synapse as the Deployments lay it out, under ``directory``."""
    steps = DOC[DOC.index("## From zero to routed traffic") :]
    (homeserver,) = re.findall(r"```yaml\n(.*?)```", steps[: steps.index("## Probes")], re.S)
    config = yaml.safe_load(homeserver.replace("/etc/synapse", str(directory)))
    if mas:
        (section,) = re.findall(r"`(matrix_authentication_service: \{.*?\})`", steps, re.S)
        config.update(yaml.safe_load(section))
    (directory / "homeserver.yaml").write_text(yaml.safe_dump(config))
    for path in (SYNAPSE / "homeserver-workers.yaml", SYNAPSE / "log.yaml", MEDIA_ON_MAIN):
        (directory / path.name).write_text(path.read_text())
    (directory / "workers").mkdir()
    for path in (SYNAPSE / "workers").glob("*.yaml"):
        (directory / "workers" / path.name).write_text(path.read_text())
    generate = [str(SYNAPSE_PYTHON), "-m", "synapse._scripts.generate_signing_key"]
    subprocess.run([*generate, "-o", str(directory / "signing.key")], check=True, timeout=60)


@pytest.mark.parametrize("variant", ["plain", "mas", "media-on-main"])
def test_synapse_accepts_what_each_deployment_gives_its_process(
    variant: str, tmp_path: Path
) -> None:
    if not SYNAPSE_PYTHON.exists():
        pytest.fail("no .venv-synapse: the README's test command installs Synapse")
    site_files(tmp_path, variant == "mas")
    deployments = rendered(variant, tmp_path / "overlay")
    processes = [d for d in deployments if "synapse-process" in d["metadata"]["labels"]]
    workers = len(list((SYNAPSE / "workers").glob("*.yaml")))
    assert len(processes) == workers + (0 if variant == "media-on-main" else 1)
    for deployment in processes:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        configs = [a.replace("/etc/synapse", str(tmp_path)) for a in container["args"]]
        if variant == "media-on-main" and deployment["metadata"]["name"] == "synapse-main":
            assert configs[-1] == str(tmp_path / MEDIA_ON_MAIN.name)
        out = subprocess.run(
            [str(SYNAPSE_PYTHON), "-m", "synapse.config", "read", "worker.worker_name", *configs],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        name = deployment["metadata"]["labels"]["synapse-process"]
        assert out.returncode == 0, (name, out.stdout, out.stderr)
        assert "Config parses OK!" in out.stdout
        expected = "None" if name == "main" else name
        assert f"worker.worker_name: {expected}" in out.stdout, (name, out.stdout)
