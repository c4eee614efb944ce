"""docker-compose.yml, the Dockerfile, Prometheus and Grafana files, checked statically.

There is no Docker engine here to run them, so every reference they make is
checked instead: the compose schema (the parts of the Compose specification
this file uses, strictly), every mounted path, pinned images, services that
exist, ports that are exposed, and the environment the shipped haproxy.cfg
reads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from spoa.demo.stack import env_name
from spoa.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]

# The Compose specification's service keys this project may use; anything else
# is a typo (compose would ignore some silently, or fail at "up").
SERVICE_KEYS: dict[str, type | tuple[type, ...]] = {
    "build": (str, dict),
    "image": str,
    "command": (list, str),
    "entrypoint": (list, str),
    "environment": (dict, list),
    "volumes": list,
    "ports": list,
    "expose": list,
    "depends_on": (list, dict),
    "restart": str,
    "deploy": dict,
    "healthcheck": dict,
    "init": bool,
    "group_add": list,
}
RESTART = {"no", "always", "on-failure", "unless-stopped"}


def test_compose_top_level_has_only_known_sections() -> None:
    assert set(COMPOSE) <= {"services", "volumes", "networks", "configs", "secrets"} | {
        k for k in COMPOSE if k.startswith("x-")
    }


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_follows_the_compose_schema(name: str) -> None:
    service = SERVICES[name]
    assert re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name)
    for key, value in service.items():
        assert key in SERVICE_KEYS, f"{name}: unknown key {key!r}"
        assert isinstance(value, SERVICE_KEYS[key]), f"{name}.{key}: {type(value).__name__}"
    assert "image" in service or "build" in service
    if "restart" in service:
        assert service["restart"] in RESTART
    for port in service.get("ports", []):
        assert re.fullmatch(r"\d+:\d+(/(tcp|udp))?", str(port)), port
    for port in service.get("expose", []):
        assert re.fullmatch(r"\d+", str(port)), port
    if "deploy" in service:
        assert set(service["deploy"]) <= {"mode", "replicas", "resources"}
        # podman-compose honours replicas only in replicated mode.
        assert "replicas" not in service["deploy"] or service["deploy"]["mode"] == "replicated"
        assert isinstance(service["deploy"].get("replicas", 1), int)
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for dependency in service.get("depends_on", []):
        assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        if isinstance(service["depends_on"], dict):
            assert set(service["depends_on"][dependency]) == {"condition"}
            assert service["depends_on"][dependency]["condition"] in conditions


def test_images_from_registries_are_pinned_to_a_version() -> None:
    for name, service in SERVICES.items():
        image = service.get("image", "")
        if "build" in service:
            continue
        assert re.search(r":v?\d+\.\d+(\.\d+)?", image), f"{name}: {image} is not pinned"
        assert not image.endswith(":latest")


def test_every_mounted_host_path_exists() -> None:
    mounts = 0
    named = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            if source in named:
                continue
            assert source.startswith("./"), f"{name}: {volume} is not a bind mount of the repo"
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            assert target.startswith("/")
            mounts += 1
    assert mounts >= 6


def test_haproxy_gets_every_variable_the_shipped_config_needs() -> None:
    haproxy = SERVICES["haproxy"]
    env: dict[str, str] = haproxy["environment"]
    config = (ROOT / "haproxy" / "haproxy.cfg").read_text()
    policy = load_policy(str(ROOT / "policies" / "synapse-workers.yaml"))
    for worker_class in policy.classes:
        if worker_class == "main":
            continue
        variable = env_name(worker_class)
        assert f"${{{variable}}}" in config, f"haproxy.cfg does not read {variable}"
        service, _, port = env[variable].rpartition(":")
        assert service in SERVICES, f"{variable} names no service"
        assert port == "8008" and "8008" in SERVICES[service]["expose"]
        assert SERVICES[service]["command"][0].startswith(f"{worker_class}-")
    assert env["SYNAPSE_MAIN"] == "main:8008"
    agent_host, _, agent_port = env["SPOA_AGENT"].rpartition(":")
    assert agent_host in SERVICES and agent_port in SERVICES[agent_host]["expose"]
    # The files haproxy.cfg loads through SPOA_CONF_DIR are mounted there.
    mounts = dict(v.split(":")[1::-1] for v in haproxy["volumes"])
    assert mounts[env["SPOA_CONF_DIR"]] == "./haproxy"
    assert (ROOT / "haproxy" / "spoe-router.conf").exists()


def test_the_agent_reads_a_policy_from_the_mounted_directory() -> None:
    agent = SERVICES["agent"]
    command: list[str] = agent["command"]
    # Compose's ${SPOA_POLICY:-default}, unset: the default.
    policy = re.sub(r"\$\{SPOA_POLICY:-([^}]+)\}", r"\1", command[command.index("--policy") + 1])
    assert policy == "/etc/spoa/policies/synapse-workers.yaml"
    (mount,) = [v for v in agent["volumes"] if policy.startswith(v.split(":")[1] + "/")]
    source, target = mount.split(":")[:2]
    host_file = ROOT / source / Path(policy).relative_to(target)
    assert host_file.exists()
    load_policy(str(host_file))
    assert "--http" in command and command[command.index("--http") + 1].endswith(":12346")


def test_dockerfile_copies_files_that_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[\w.-]*-slim", dockerfile, re.M)
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), source
    # The runtime image checks the C speedup was built into the wheel.
    assert "c.SPEEDUPS" in dockerfile and "setup.py" in dockerfile
    assert "USER nobody" in dockerfile
    # The wheel carries the bundled policies ("extends: synapse-workers").
    assert re.search(r"^COPY policies \./policies$", dockerfile, re.M)


def test_prometheus_scrapes_services_that_exist() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"spoa", "haproxy"}
    for job in jobs.values():
        for target in job["static_configs"][0]["targets"]:
            host, _, port = target.rpartition(":")
            service = SERVICES[host]
            published = {str(p).split(":")[-1] for p in service.get("ports", [])}
            assert port in published | {str(p) for p in service.get("expose", [])}
    prometheus = SERVICES["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    datasource = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]
    assert datasource["uid"] == "prometheus"
    assert datasource["url"].startswith("http://prometheus:")
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/matrix-spoa.yml").read_text()
    )["providers"][0]
    grafana = SERVICES["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    dashboards = ROOT / mounted[provider["options"]["path"]]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).exists()


DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/matrix-spoa.json").read_text())


def dashboard_queries() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    assert DASHBOARD["uid"] == "matrix-spoa"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "prometheus"
            assert target["expr"].count("(") == target["expr"].count(")")
    titles = " ".join(p["title"].lower() for p in DASHBOARD["panels"])
    for topic in ("by class", "by rule", "latency", "reload", "protocol", "backend", "server"):
        assert topic in titles


def dashboard_metric_names() -> set[str]:
    """Metric names in the queries: every selector is written name{...} or name[...]."""
    names = set()
    for expr in dashboard_queries():
        names |= set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr))
    return names - {"by", "sum", "rate", "increase", "max", "min", "histogram_quantile"}


def test_dashboard_queries_name_agent_and_haproxy_metrics() -> None:
    names = dashboard_metric_names()
    assert any(n.startswith("spoa_") for n in names)
    assert any(n.startswith("haproxy_") for n in names)
    assert all(n.startswith(("spoa_", "haproxy_", "process_")) for n in names), names


def test_the_fallback_map_is_made_before_haproxy_starts_and_pushed_live_after() -> None:
    """One named volume: fallback-map writes the map before HAProxy starts, the agent
    rewrites it and pushes each policy through HAProxy's runtime API socket there."""
    agent, haproxy, once = SERVICES["agent"], SERVICES["haproxy"], SERVICES["fallback-map"]
    env: dict[str, str] = haproxy["environment"]
    written = env["SPOA_FALLBACK_MAP"]
    directory = str(Path(written).parent)
    command = agent["command"]
    assert command[command.index("--fallback-map") + 1] == written
    assert command[command.index("--haproxy-socket") + 1] == env["SPOA_ADMIN_SOCKET"]
    assert str(Path(env["SPOA_ADMIN_SOCKET"]).parent) == directory
    assert once["command"][0] == "fallback" and once["command"][-1] == written
    assert once["command"][1] == command[command.index("--policy") + 1]
    for service in (agent, haproxy, once):
        assert f"fallback:{directory}" in service["volumes"]
    # HAProxy waits for the map, not for the agent.
    assert haproxy["depends_on"]["fallback-map"] == {"condition": "service_completed_successfully"}
    assert "agent" not in haproxy["depends_on"]
    # The agent is in HAProxy's group, which owns the socket (mode 660).
    assert env["SPOA_ADMIN_SOCKET_MODE"] == "660" and agent["group_add"] == ["99"]
    config = (ROOT / "haproxy" / "haproxy.cfg").read_text()
    assert '"${SPOA_FALLBACK_MAP-/run/matrix-spoa/fallback.map}"' in config
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"chown nobody:99 {directory}" in dockerfile and f"chmod 2775 {directory}" in dockerfile
