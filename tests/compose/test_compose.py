"""docker-compose.yml itself, run with podman-compose as a user runs it with docker compose.

The only change is deploy/compose/local-images.yml, which swaps the images a
registry would give for ones built from Debian's archive (./dev.sh
compose-images). Grafana is left out: there is no Grafana in Debian's archive
to build a stand-in from (its provisioning is checked in tests/test_deploy.py).
Runs with SPOA_COMPOSE=1, as ./dev.sh test does in CI.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.harness import wait_until

pytestmark = pytest.mark.compose

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / ".venv" / "bin" / "podman-compose"
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
#: Every service but Grafana (no stand-in image can be built for it here).
RUN = [name for name in SERVICES if name != "grafana"]
TOKEN = "syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c"
SAMPLES = {
    "synchrotron": ("GET", "/_matrix/client/v3/sync?since=s1"),
    "initial_sync": ("GET", "/_matrix/client/v3/sync"),
    "event_creator": ("PUT", "/_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/t1"),
    "client_reader": ("POST", "/_matrix/client/v3/keys/query"),
    "media_repository": ("GET", "/_matrix/client/v1/media/download/example.org/abc"),
    "federation_inbound": ("PUT", "/_matrix/federation/v1/send/17"),
    "federation_reader": ("GET", "/_matrix/federation/v1/state_ids/!r:x?event_id=%24e"),
    "typing": ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@alice:x"),
    "receipts": ("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/%24e"),
    "main": ("GET", "/_synapse/client/pick_idp"),
}


def request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    if headers is None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
    if path.startswith("/_matrix/federation"):
        headers = {"Authorization": 'X-Matrix origin="remote.example",key="k",sig="s"'}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        body = b"{}" if method in ("PUT", "POST") else None
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}
    except (OSError, http.client.HTTPException):
        return 0, {}
    finally:
        conn.close()


SITE_POLICY = """\
version: 1
extends: ./synapse-workers.yaml
rules:
  patch: [{name: receipts, add_path: '^/_site/receipts$'}]
"""


@dataclass
class Project:
    directory: Path
    name: str

    def compose(self, *args: str, timeout: float = 600) -> str:
        out = subprocess.run(
            [
                str(COMPOSE),
                "-p",
                self.name,
                "-f",
                "docker-compose.yml",
                "-f",
                "deploy/compose/local-images.yml",
                *args,
            ],
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return out.stdout

    def _ps(self, service: str, *options: str) -> list[str]:
        """``podman ps`` of this project's containers of ``service``, one word each."""
        out = subprocess.run(
            [
                "podman",
                "ps",
                "--filter",
                f"label=com.docker.compose.project={self.name}",
                "--filter",
                f"label=com.docker.compose.service={service}",
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.split()

    def containers(self, service: str) -> list[str]:
        return self._ps(service, "-q")

    def exit_codes(self, service: str) -> list[str]:
        return self._ps(service, "-a", "--filter", "status=exited", "--format", "{{.ExitCode}}")

    def servers_up(self, backend: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", 8404, timeout=5)
        try:
            conn.request("GET", "/stats;csv")
            text = conn.getresponse().read().decode()
        except OSError:
            return -1
        finally:
            conn.close()
        count = 0
        for line in text.splitlines():
            fields = line.split(",")
            servers = fields[1] not in ("FRONTEND", "BACKEND", "main")
            if len(fields) > 17 and fields[0] == backend and servers:
                count += fields[17].startswith("UP")
        return count

    def remove_leftovers(self) -> None:
        """What "down" leaves: podman-compose removes only the replicas the file
        declares, so a scaled-up one stays, and with it the pod and the network."""
        label = f"label=com.docker.compose.project={self.name}"
        listing = ["podman", "ps", "-aq", "--filter", label]
        left = subprocess.run(listing, capture_output=True, text=True, timeout=30, check=False)
        commands = [["podman", "rm", "-f", *left.stdout.split()]] if left.stdout.split() else []
        commands += [
            ["podman", "pod", "rm", "-f", "--ignore", f"pod_{self.name}"],
            ["podman", "network", "rm", "-f", f"{self.name}_default"],
        ]
        for command in commands:
            subprocess.run(command, capture_output=True, timeout=120, check=False)

    def haproxy_log(self) -> str:
        (container,) = self.containers("haproxy")
        out = subprocess.run(
            ["podman", "logs", container], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout + out.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    if os.environ.get("SPOA_COMPOSE") != "1":
        pytest.skip("the compose run needs SPOA_COMPOSE=1 and ./dev.sh compose-images")
    if shutil.which("podman") is None or not COMPOSE.exists():
        pytest.fail("podman and podman-compose are missing: ./dev.sh compose-images")
    started = time.monotonic()
    # The files users have, copied: the test edits the policy on "the host".
    directory = tmp_path_factory.mktemp("compose")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, directory / name)
    # A site policy, as docs/deploy-compose.md shows: a file in policies/ that
    # extends the shipped one (by file, so the edit test's edit of the base
    # applies through it) and patches a rule, named in .env.
    (directory / "policies" / "site.yaml").write_text(SITE_POLICY)
    (directory / ".env").write_text("SPOA_POLICY=site.yaml\n")
    project = Project(directory, f"spoa-ci-{random.randrange(16**6):06x}")
    up = float("nan")
    try:
        project.compose("up", "-d", "--no-build", *RUN)
        wait_until(lambda: project.servers_up("be_synchrotron") == 3, 90, "3 synchrotrons UP")
        wait_until(lambda: project.servers_up("be_spoa") == 1, 60, "the agent UP")
        up = time.monotonic() - started
        yield project
    finally:
        try:
            project.compose("down", timeout=300)
        finally:
            project.remove_leftovers()
            print(
                f"\ncompose: up in {up:.0f} s, {time.monotonic() - started:.0f} s from up to down"
            )


def test_all_services_are_up_and_the_one_shot_ones_done(project: Project) -> None:
    for service in RUN:
        if SERVICES[service].get("restart") == "no":
            # fallback-map: made the map before HAProxy started, and ended.
            assert project.containers(service) == [], service
            assert project.exit_codes(service) == ["0"], service
            continue
        replicas = SERVICES[service].get("deploy", {}).get("replicas", 1)
        assert len(project.containers(service)) == replicas, service


def test_traffic_through_haproxy_lands_on_the_right_class(project: Project) -> None:
    for worker_class, (method, path) in SAMPLES.items():
        status, document = request(8008, method, path)
        assert status == 200, (worker_class, status)
        assert document["class"] == worker_class, (path, document)
    log = project.haproxy_log()
    assert "via=agent class=synchrotron" in log


def test_the_site_policy_named_in_env_routes_and_makes_the_fallback_map(
    project: Project,
) -> None:
    # The patched rule takes its added path, beside the base's own.
    assert request(8008, "POST", "/_site/receipts")[1]["class"] == "receipts"
    assert request(8008, "POST", SAMPLES["receipts"][1])[1]["class"] == "receipts"
    conn = http.client.HTTPConnection("127.0.0.1", 12346, timeout=5)
    try:
        conn.request("GET", "/status.json")
        policy = json.loads(conn.getresponse().read())["policy"]
    finally:
        conn.close()
    assert policy["file"] == "/etc/spoa/policies/site.yaml"
    # The fallback's map (made by the one-shot service, kept by the agent) is of
    # the site policy too.
    (agent,) = project.containers("agent")
    header = subprocess.run(
        ["podman", "exec", agent, "head", "-n", "1", "/run/matrix-spoa/fallback.map"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert header.split()[-1] == policy["version"], header


def test_scaling_a_class_is_picked_up_through_dns(project: Project) -> None:
    project.compose("up", "-d", "--no-build", "--scale", "synchrotron=4", "synchrotron")
    wait_until(lambda: project.servers_up("be_synchrotron") == 4, 60, "a 4th synchrotron")
    seen = set()
    for n in range(200):
        target = f"/_matrix/client/v3/sync?since=s{n}&access_token=t{n}"
        status, document = request(8008, "GET", target, headers={})
        assert status == 200
        seen.add(document["worker"])
    assert len(seen) == 4, seen


def test_a_policy_edit_on_the_host_applies_within_a_second(project: Project) -> None:
    profile = "/_matrix/client/v3/profile/@alice:x"
    assert request(8008, "GET", profile)[1]["class"] == "event_creator"
    policy = project.directory / "policies" / "synapse-workers.yaml"
    text = policy.read_text()
    rule = (
        "  - name: profile_reads\n    class: client_reader\n"
        "    path: '^/_matrix/client/v3/profile/'\n\n"
    )
    edited = text.replace("rules:\n", "rules:\n" + rule, 1)
    assert edited != text
    # Saved as editors save: a new file renamed over the old one.
    fresh = policy.with_name(".synapse-workers.yaml.swp")
    fresh.write_text(edited)
    fresh.replace(policy)
    saved = time.monotonic()
    while request(8008, "GET", profile)[1].get("class") != "client_reader":
        assert time.monotonic() - saved < 5, "the edit was not applied"
        time.sleep(0.05)
    elapsed = time.monotonic() - saved
    print(f"\ncompose: policy edit applied {elapsed:.2f} s after the save")
    assert elapsed < 1.5  # the agent checks every second


def test_prometheus_scrapes_the_agent_and_haproxy(project: Project) -> None:
    def targets() -> dict[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", 9090, timeout=5)
        try:
            conn.request("GET", "/api/v1/targets")
            data = json.loads(conn.getresponse().read())
        except (OSError, ValueError):
            return {}
        finally:
            conn.close()
        return {t["labels"]["job"]: t["health"] for t in data["data"]["activeTargets"]}

    wait_until(lambda: targets().get("haproxy") == "up", 60, "Prometheus to scrape HAProxy")
    wait_until(lambda: targets().get("spoa") == "up", 60, "Prometheus to scrape the agent")
    # And it evaluates matrix-spoa's alerting rules (deploy/prometheus/alerts.yml).
    conn = http.client.HTTPConnection("127.0.0.1", 9090, timeout=5)
    try:
        conn.request("GET", "/api/v1/rules")
        groups = json.loads(conn.getresponse().read())["data"]["groups"]
    finally:
        conn.close()
    names = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"SpoaAgentDown", "SpoaClassWithoutWorker", "SpoaPolicyVersionsDiffer"} <= names


def test_the_agent_killed_leaves_routing_to_the_fallback_with_no_failed_request(
    project: Project,
) -> None:
    failures: list[int] = []
    sent = 0
    stop = threading.Event()

    def keep_sending() -> None:
        nonlocal sent
        while not stop.is_set():
            status, _ = request(8008, *SAMPLES["synchrotron"])
            sent += 1
            if status != 200:
                failures.append(status)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(1)
        (agent,) = project.containers("agent")
        subprocess.run(["podman", "kill", agent], capture_output=True, timeout=30, check=True)
        time.sleep(5)
    finally:
        stop.set()
        sender.join()
    assert sent > 50 and failures == []
    assert "via=fallback class=synchrotron" in project.haproxy_log()
    # The fallback routes by the map the agent pushed into HAProxy: every
    # class keeps its workers, stream writers included, and the policy
    # edited on the host (profile reads on client_reader) holds with no
    # reload of HAProxy.
    for worker_class, (method, path) in SAMPLES.items():
        status, body = request(8008, method, path)
        assert (status, body.get("class")) == (200, worker_class), (worker_class, body)
    status, body = request(8008, "GET", "/_matrix/client/v3/profile/@alice:x")
    assert (status, body.get("class")) == (200, "client_reader")
    assert "via=fallback class=client_reader rule=profile_reads" in project.haproxy_log()
