"""Synapse's processes as Kubernetes objects, made from deploy/synapse's files.

``python -m spoa.kube_synapse deploy/synapse > deploy/synapse/kubernetes.yaml``
writes one Deployment per process (the main process and each worker file),
labelled with the routing class the Services of deploy/kubernetes select
(``synapse-worker-class``), one Service per process of ``instance_map`` (its
replication listener, by the host name homeserver-workers.yaml gives it),
Redis, and the media store's volume claim. The tests render it again and
compare, so the manifests follow the worker files.

Every process reads, under ``/etc/synapse``: the site's ``homeserver.yaml``
and ``signing.key`` (the Secret ``synapse-homeserver``, the operator's:
server name, database, secrets), then ``homeserver-workers.yaml``, then its
own worker file (the ConfigMap ``synapse-workers``, made by
deploy/synapse/kustomization.yaml from the same files).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from .synapsecfg import MAIN, Process, load_synapse

HTTP_PORT = 8008
REPLICATION_PORT = 9093
#: The uid and gid of Synapse's official image.
SYNAPSE_UID = 991
MEDIA_PATH = "/media"


def dns_name(name: str) -> str:
    """A process name as a Kubernetes object name: synapse-typing-1."""
    return "synapse-" + name.replace("_", "-")


def _probe(period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": "/health", "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def _hardened() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def deployment(process: Process, worker_file: str | None) -> dict[str, Any]:
    """The Deployment of one Synapse process."""
    labels = {"synapse-worker-class": process.worker_class, "synapse-process": process.name}
    if worker_file is None:
        command = ["python", "-m", "synapse.app.homeserver"]
    else:
        command = ["python", "-m", "synapse.app.generic_worker"]
    configs = ["homeserver.yaml", "homeserver-workers.yaml"]
    items = [
        {"key": "homeserver-workers.yaml", "path": "homeserver-workers.yaml"},
        {"key": "log.yaml", "path": "log.yaml"},
    ]
    if worker_file is not None:
        configs.append(f"workers/{worker_file}")
        items.append({"key": worker_file, "path": f"workers/{worker_file}"})
    args = [a for c in configs for a in ("-c", f"/etc/synapse/{c}")]
    ports = [{"name": "http", "containerPort": HTTP_PORT}]
    if any(listener.resources == {"replication"} for listener in process.listeners):
        ports.append({"name": "replication", "containerPort": REPLICATION_PORT})
    mounts = [
        {"name": "config", "mountPath": "/etc/synapse", "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {
            "name": "config",
            "projected": {
                "sources": [
                    {
                        "secret": {
                            "name": "synapse-homeserver",
                            "items": [
                                {"key": "homeserver.yaml", "path": "homeserver.yaml"},
                                {"key": "signing.key", "path": "signing.key"},
                            ],
                        }
                    },
                    {"configMap": {"name": "synapse-workers", "items": items}},
                ]
            },
        },
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    spec: dict[str, Any] = {"replicas": 1, "selector": {"matchLabels": labels}}
    if process.serves_media and process.name != MAIN:
        mounts.append({"name": "media", "mountPath": MEDIA_PATH})
        volumes.append({"name": "media", "persistentVolumeClaim": {"claimName": "synapse-media"}})
        # One pod at a time on a ReadWriteOnce volume.
        spec["strategy"] = {"type": "Recreate"}
    container = {
        "name": "synapse",
        "image": "synapse",
        "command": command,
        "args": args,
        "ports": ports,
        # The main process may run database migrations before it answers.
        "startupProbe": _probe(5, 120 if process.name == MAIN else 60),
        "readinessProbe": _probe(5, 2),
        "livenessProbe": _probe(10, 6),
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "2Gi" if process.name == MAIN else "1Gi"},
        },
        "securityContext": _hardened(),
        "volumeMounts": mounts,
    }
    spec["template"] = {
        "metadata": {"labels": labels},
        "spec": {
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": SYNAPSE_UID,
                "runAsGroup": SYNAPSE_UID,
                "fsGroup": SYNAPSE_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            # /sync long-polls finish before the process stops.
            "terminationGracePeriodSeconds": 40,
            "containers": [container],
            "volumes": volumes,
        },
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": dns_name(process.name), "labels": labels},
        "spec": spec,
    }


def replication_service(name: str, host: str) -> dict[str, Any]:
    """The Service by which other processes reach ``name``'s replication listener."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": host},
        "spec": {
            "selector": {"synapse-process": name},
            "ports": [
                {"name": "replication", "port": REPLICATION_PORT, "targetPort": "replication"}
            ],
        },
    }


def redis() -> list[dict[str, Any]]:
    """Redis, through which the processes talk (homeserver-workers.yaml: host redis)."""
    labels = {"app.kubernetes.io/name": "redis"}
    container = {
        "name": "redis",
        "image": "redis",
        "args": ["--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": 6379}],
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": _hardened(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "redis", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "securityContext": {
                            "runAsNonRoot": True,
                            "runAsUser": 999,
                            "runAsGroup": 999,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [container],
                        "volumes": [{"name": "data", "emptyDir": {}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "redis"},
            "spec": {
                "selector": labels,
                "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}],
            },
        },
    ]


def media_claim() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "synapse-media"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "50Gi"}},
        },
    }


def render(directory: Path) -> list[dict[str, Any]]:
    """Every object of the Synapse base, from ``directory`` (deploy/synapse)."""
    homeserver = directory / "homeserver-workers.yaml"
    files = sorted((directory / "workers").glob("*.yaml"))
    synapse = load_synapse(str(homeserver), [str(f) for f in files])
    documents = [deployment(synapse.main, None)]
    for process, path in zip(synapse.workers, files, strict=True):
        documents.append(deployment(process, path.name))
    instances = yaml.safe_load(homeserver.read_text()).get("instance_map") or {}
    for name, where in instances.items():
        if name != MAIN:  # synapse-main is deploy/kubernetes's, with both ports
            documents.append(replication_service(name, where["host"]))
    if any(p.serves_media for p in synapse.workers):
        documents.append(media_claim())
    documents.extend(redis())
    return documents


HEADER = """\
# Synapse's processes on Kubernetes, one Deployment per file of workers/ and
# one for the main process. Made from this directory's files by
#   python -m spoa.kube_synapse deploy/synapse > deploy/synapse/kubernetes.yaml
# (the tests check it is current): edit the worker files, not this.
"""


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m spoa.kube_synapse DIRECTORY", file=sys.stderr)
        return 2
    sys.stdout.write(HEADER)
    sys.stdout.write(yaml.safe_dump_all(render(Path(argv[0])), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
