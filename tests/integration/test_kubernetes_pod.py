"""The pod deploy/kubernetes describes, run for real: HAProxy and the agent with the
files, environment, arguments and ports the rendered manifests give them.

The pod gets its own network namespace (loopback shared by HAProxy and the agent,
an address the "cluster" reaches it on, a resolv.conf naming the cluster DNS, as
the kubelet gives a pod). The cluster side, in the test's namespace: a DNS server
answering the SRV and A records Kubernetes would publish for the headless
Services, and demo workers as the Synapse pods behind them. Only the mount points
move, to a temporary directory, laid out as the kubelet lays out ConfigMap
volumes (a ``..data`` symlink swapped on update).
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from spoa.demo.client import Client
from spoa.demo.dns import Zone, serve_dns
from spoa.demo.fleet import HASHED
from spoa.demo.stack import haproxy_at_least, haproxy_binary, haproxy_version, stop_process
from spoa.demo.workers import DemoWorker, WorkerSpec
from spoa.traffic import one_per_key
from tests.integration.harness import wait_until
from tests.k8s_render import container, containers, kustomize, one, pod_spec, site_overlay

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SPOA = ROOT / ".venv" / "bin" / "spoa"
T = TypeVar("T")

SAMPLES = {
    "synchrotron": ("GET", "/_matrix/client/v3/sync?since=s1"),
    "event_creator": ("PUT", "/_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/t1"),
    "media_repository": ("GET", "/_matrix/client/v1/media/download/example.org/abc"),
    "federation_inbound": ("PUT", "/_matrix/federation/v1/send/17"),
    "typing": ("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@alice:x"),
    "main": ("GET", "/_synapse/client/pick_idp"),
}
TOKEN = "syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c"


#: The selector of MAS's Service (deploy/kubernetes/mas), class "mas".
MAS_SELECTOR = {"app.kubernetes.io/name": "matrix-authentication-service"}


def service_name(worker_class: str) -> str:
    if worker_class == "mas":
        return "matrix-authentication-service"
    return "synapse-" + worker_class.replace("_", "-")


def headless_classes(documents: list[dict[str, Any]]) -> list[str]:
    """The classes whose pods HAProxy finds by the SRV records of a headless Service."""
    found = []
    for d in documents:
        spec = d.get("spec", {})
        if d["kind"] == "Service" and spec.get("clusterIP") == "None":
            assert [port["name"] for port in spec["ports"]] == ["http"], d
            selector = spec["selector"]
            found.append("mas" if selector == MAS_SELECTOR else selector["synapse-worker-class"])
    return found


@dataclass
class Cluster:
    """The cluster side: DNS and Synapse stand-ins, on an event loop of their own."""

    host_ip: str
    main_ip: str
    #: Where the Services are: <namespace>.svc.cluster.local.
    domain: str = "matrix.svc.cluster.local"
    zone: Zone = field(default_factory=Zone)
    workers: dict[str, list[DemoWorker]] = field(default_factory=dict)
    #: Pods made so far per class: a new pod never takes an old one's name.
    born: dict[str, int] = field(default_factory=dict)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def publish(self, worker_class: str) -> None:
        workers = self.workers.get(worker_class, [])
        name = f"_http._tcp.{service_name(worker_class)}.{self.domain}"
        subdomain = f"{service_name(worker_class)}.{self.domain}"
        self.zone.set_service(
            name,
            [
                (f"{w.spec.name.replace('_', '-')}.{subdomain}", w.spec.host, w.port)
                for w in workers
            ],
        )

    def add(self, worker_class: str, host: str | None = None, port: int = 0) -> DemoWorker:
        workers = self.workers.setdefault(worker_class, [])
        self.born[worker_class] = self.born.get(worker_class, 0) + 1
        name = f"{worker_class}-{self.born[worker_class]}"
        worker = self.call(
            DemoWorker(WorkerSpec(name, worker_class, host or self.host_ip, port)).start()
        )
        workers.append(worker)
        return worker

    def remove(self, worker_class: str, worker: DemoWorker | None = None) -> None:
        """Delete a pod (the newest by default) and its DNS records."""
        workers = self.workers[worker_class]
        gone = workers.pop() if worker is None else workers.pop(workers.index(worker))
        self.call(gone.stop())
        self.publish(worker_class)

    def close(self) -> None:
        for workers in self.workers.values():
            for worker in workers:
                self.call(worker.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def write_configmap(directory: Path, files: dict[str, str], generation: int) -> None:
    """Files as the kubelet writes a ConfigMap volume: ..data swapped atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / f"..2026_12_02_00_00_0{generation}.{random.randrange(10**9)}"
    for relative, text in files.items():
        target = stamp / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text.encode())
    temporary = directory / "..data_tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(stamp.name)
    old = (directory / "..data").resolve() if (directory / "..data").exists() else None
    os.replace(temporary, directory / "..data")
    for relative in files:
        top = relative.split("/")[0]
        link = directory / top
        if not link.is_symlink():
            link.symlink_to(f"..data/{top}")
    if old is not None and old != stamp:
        shutil.rmtree(old)


@dataclass
class Pod:
    namespace: str
    ip: str
    root: Path
    documents: list[dict[str, Any]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def mapped(self, name: str, value: str) -> str:
        """A path of container ``name``, moved under the directory standing for its mounts."""
        for mount in container(self.documents, name).get("volumeMounts", []):
            prefix = mount["mountPath"]
            if value == prefix or value.startswith(prefix + "/"):
                return str(self.root / container_dir(name, prefix)) + value[len(prefix) :]
        return value

    def env(self, name: str) -> dict[str, str]:
        """Container ``name``'s environment, as the kubelet gives it."""
        found = {}
        for variable in container(self.documents, name).get("env", []):
            if "value" in variable:
                found[variable["name"]] = self.mapped(name, variable["value"])
                continue
            # The downward API: only the fields the manifests use.
            assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
            deployment = one(self.documents, "Deployment", "matrix-spoa")
            found[variable["name"]] = deployment["metadata"]["namespace"]
        return found

    def start(self, name: str, program: str) -> None:
        spec = container(self.documents, name)
        env = self.env(name)
        args = [self.mapped(name, a) for a in spec["args"]]
        if name == "haproxy":
            args = args[1:]  # "haproxy" itself, the image's binary
        log = (self.root / f"{name}.log").open("ab")
        environment = [f"{k}={v}" for k, v in env.items()]
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, "env", *environment, program, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def port(self, container_name: str, port: str | int) -> int:
        if isinstance(port, int):
            return port
        for p in container(self.documents, container_name)["ports"]:
            if p["name"] == port:
                return int(p["containerPort"])
        raise KeyError(port)

    def get(self, port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.ip, port, timeout=10)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            if path.startswith("/_matrix/federation"):
                headers = {"Authorization": 'X-Matrix origin="remote.example",key="k",sig="s"'}
            conn.request(
                method, path, body=b"{}" if method in ("PUT", "POST") else None, headers=headers
            )
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except OSError:
            return 0, {}, b""
        finally:
            conn.close()

    def servers(self, backend: str) -> dict[str, str]:
        """HAProxy's status of each server slot of ``backend`` (main backups left out)."""
        status, _, body = self.get(self.port("haproxy", "stats"), "/stats;csv")
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND", "main")
        }

    def servers_up(self, backend: str) -> int:
        return sum(1 for s in self.servers(backend).values() if s.startswith("UP"))

    def log_lines(self, name: str) -> list[str]:
        return (self.root / f"{name}.log").read_text(errors="replace").splitlines()


def container_dir(name: str, mount_path: str) -> str:
    return f"{name}{mount_path}"


def layout_volumes(pod: Pod) -> None:
    """Each container's volume mounts, filled from the rendered ConfigMaps."""
    spec = pod_spec(pod.documents)
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in containers(pod.documents):
        for mount in c.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            target = pod.root / container_dir(c["name"], mount["mountPath"])
            files: dict[str, str] = {}
            if "projected" in volume:
                for source in volume["projected"]["sources"]:
                    data = one(pod.documents, "ConfigMap", source["configMap"]["name"])["data"]
                    for item in source["configMap"]["items"]:
                        files[item["path"]] = data[item["key"]]
            elif "configMap" in volume:
                files = dict(one(pod.documents, "ConfigMap", volume["configMap"]["name"])["data"])
            else:
                # An emptyDir: one directory per volume, shared by the
                # containers that mount it (as the agent's table is).
                shared = pod.root / "emptydir" / mount["name"]
                shared.mkdir(parents=True, exist_ok=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_symlink():
                    target.symlink_to(shared)
                continue
            write_configmap(target, files, 1)


@dataclass
class Network:
    """The cluster network: a bridge for the host (DNS, Synapse's pods) and the router pods.

    Each router pod has a network namespace of its own, a veth on the bridge,
    and the resolv.conf the kubelet writes (``/etc/netns/<namespace>``).
    """

    tag: str
    subnet: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"spk{self.tag}b"

    def host(self, n: int) -> str:
        return f"{self.subnet}.{n}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")

    def add_address(self, n: int) -> str:
        """An address of the host side (the cluster DNS, a Synapse pod)."""
        _ip("addr", "add", f"{self.host(n)}/24", "dev", self.bridge)
        return self.host(n)

    def attach(self, n: int, dns: str, domain: str) -> tuple[str, str]:
        """A router pod's namespace at address ``n``: its name and address."""
        namespace, outside, inside = f"spoa-pod-{self.tag}-{n}", f"spk{self.tag}{n}h", "eth0"
        self.namespaces.append(namespace)
        _ip("netns", "add", namespace)
        _ip("link", "add", outside, "type", "veth", "peer", "name", f"spk{self.tag}{n}p")
        _ip("link", "set", f"spk{self.tag}{n}p", "netns", namespace)
        _ip("-n", namespace, "link", "set", f"spk{self.tag}{n}p", "name", inside)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("-n", namespace, "addr", "add", f"{self.host(n)}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        # What the kubelet writes into a pod: the cluster DNS and its search path.
        etc = Path("/etc/netns") / namespace
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(
            f"nameserver {dns}\nsearch {domain} svc.cluster.local cluster.local\noptions ndots:5\n"
        )
        return namespace, self.host(n)

    def short_root(self, n: int) -> Path:
        """A short path for router pod ``n``'s files (a symlink, removed by :meth:`delete`)."""
        return Path("/tmp") / f"spoa-pod-{self.tag}-{n}"

    def delete(self) -> None:
        for link in Path("/tmp").glob(f"spoa-pod-{self.tag}-*"):
            link.unlink(missing_ok=True)
        for namespace in self.namespaces:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)
            shutil.rmtree(Path("/etc/netns") / namespace, ignore_errors=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)


def start_pod(
    network: Network, n: int, dns: str, documents: list[dict[str, Any]], root: Path
) -> Pod:
    """A router pod of the rendered manifests at address ``n``, its agent and HAProxy up."""
    deployment = one(documents, "Deployment", "matrix-spoa")
    namespace, ip = network.attach(
        n, dns, f"{deployment['metadata']['namespace']}.svc.cluster.local"
    )
    # The pod's files under a short name: HAProxy refuses a unix socket path
    # (the runtime API's, in the fallback volume) longer than 97 bytes.
    root.mkdir(parents=True, exist_ok=True)
    short = network.short_root(n)
    short.symlink_to(root)
    pod = Pod(namespace, ip, short, documents)
    layout_volumes(pod)
    # Init containers first, each to its end, as the kubelet runs them.
    for init in pod_spec(documents).get("initContainers", []):
        pod.start(init["name"], str(SPOA))
        assert pod.procs[init["name"]].wait(30) == 0, pod.log_lines(init["name"])
    pod.start("agent", str(SPOA))
    pod.start("haproxy", haproxy_binary())
    agent_port = pod.port("agent", "agent-http")
    wait_until(lambda: pod.get(agent_port, "/healthz")[0] == 200, 30, "the agent's /healthz")
    wait_until(lambda: pod.servers_up("be_spoa") == 1, 30, "HAProxy to have its agent UP")
    return pod


def stop_pod(pod: Pod) -> None:
    for proc in pod.procs.values():
        stop_process(proc)


@pytest.fixture(scope="module")
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a pod's network namespace needs root and iproute2")
    network = Network(f"{random.randrange(16**4):04x}", f"10.213.{random.randrange(1, 250)}")
    try:
        network.create()
        yield network
    finally:
        network.delete()


@contextmanager
def booted(
    network: Network, documents: list[dict[str, Any]], root: Path, n: int
) -> Iterator[tuple[Pod, Cluster]]:
    """The cluster side at addresses n (DNS, workers) and n + 2 (main), a router pod at n + 1."""
    namespace = one(documents, "Deployment", "matrix-spoa")["metadata"]["namespace"]
    host_ip, main_ip = network.add_address(n), network.add_address(n + 2)
    cluster: Cluster | None = None
    pod: Pod | None = None
    try:
        cluster = Cluster(host_ip, main_ip, f"{namespace}.svc.cluster.local")
        dns, _ = cluster.call(serve_dns(cluster.zone, host_ip, 53))
        # Synapse's pods: main behind synapse-main (by its full name in the
        # pod's namespace), one worker per class behind its headless Service.
        main = cluster.add("main", main_ip, 8008)
        cluster.zone.set_addresses(f"synapse-main.{cluster.domain}", [main_ip])
        for worker_class in headless_classes(documents):
            cluster.add(worker_class)
            cluster.publish(worker_class)
        assert main.port == 8008
        pod = start_pod(network, n + 1, host_ip, documents, root)
        wait_until(
            lambda: pod is not None and pod.servers_up("be_synchrotron") == 1,
            30,
            "HAProxy to find its workers through DNS",
        )
        yield pod, cluster
        dns.close()
    finally:
        if pod is not None:
            stop_pod(pod)
        if cluster is not None:
            cluster.close()


@pytest.fixture(scope="module")
def pod(
    network: Network, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pod, Cluster]]:
    documents = kustomize(ROOT / "deploy" / "kubernetes")
    with booted(network, documents, tmp_path_factory.mktemp("pod"), 1) as started:
        yield started


def route(pod: Pod, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, the worker's answer, and HAProxy's log line for one request."""
    mark = len(pod.log_lines("haproxy"))
    status, _, body = pod.get(pod.port("haproxy", "http"), path, method)
    plain = path.split("?", 1)[0]
    found: dict[str, str] = {}

    def logged() -> bool:  # HAProxy writes the line after the response
        for line in pod.log_lines("haproxy")[mark:]:
            if f" {plain} " in f"{line} ":
                found.update(dict(w.split("=", 1) for w in line.split() if "=" in w))
                return True
        return False

    wait_until(logged, 5, f"HAProxy's log line for {plain}")
    return status, json.loads(body) if body.startswith(b"{") else {}, found


def test_the_probes_of_the_manifests_answer(pod: tuple[Pod, Cluster]) -> None:
    p, _ = pod
    for c in pod_spec(p.documents)["containers"]:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c:
                get = c[probe]["httpGet"]
                assert p.get(p.port(c["name"], get["port"]), get["path"])[0] == 200, (
                    c["name"],
                    probe,
                )


def test_requests_reach_their_class_through_the_services(pod: tuple[Pod, Cluster]) -> None:
    p, cluster = pod
    for worker_class, (method, path) in SAMPLES.items():
        status, document, logged = route(p, method, path)
        assert status == 200, (worker_class, status)
        assert document["class"] == worker_class, (path, document)
        assert logged["via"] == "agent"
        # The log names the pod that answered by its address.
        pod_ip = cluster.main_ip if worker_class == "main" else cluster.host_ip
        assert logged["srv"] == document["address"], (logged, document)
        assert document["address"].startswith(f"{pod_ip}:")


def test_pods_added_and_removed_are_followed_without_a_reload(pod: tuple[Pod, Cluster]) -> None:
    p, cluster = pod
    haproxy_pid = p.procs["haproxy"].pid
    cluster.add("synchrotron")
    cluster.publish("synchrotron")
    wait_until(lambda: p.servers_up("be_synchrotron") == 2, 30, "a second synchrotron pod")
    cluster.remove("synchrotron")
    # Gone from DNS: its slot is freed (MAINT, no address), not merely DOWN.
    wait_until(
        lambda: sum(s.startswith("MAINT") for s in p.servers("be_synchrotron").values()) == 15,
        60,
        "the second pod's slot to be freed",
    )
    assert p.servers_up("be_synchrotron") == 1
    status, document, _ = route(p, *SAMPLES["synchrotron"])
    assert (status, document["worker"]) == (200, "synchrotron-1")
    assert p.procs["haproxy"].poll() is None and p.procs["haproxy"].pid == haproxy_pid
    assert not any("reload" in line.lower() for line in p.log_lines("haproxy"))


def test_a_configmap_update_of_the_policy_reaches_the_agent(pod: tuple[Pod, Cluster]) -> None:
    p, _ = pod
    agent = container(p.documents, "agent")
    (mount,) = [m for m in agent["volumeMounts"] if m["name"] == "policy"]
    directory = p.root / container_dir("agent", mount["mountPath"])
    profile = "/_matrix/client/v3/profile/@alice:x"
    assert route(p, "GET", profile)[1]["class"] == "event_creator"
    site = yaml.safe_load(one(p.documents, "ConfigMap", "spoa-policy")["data"]["policy.yaml"])
    site["rules"] = {
        "before": [
            {
                "name": "profile_reads",
                "class": "client_reader",
                "path": "^/_matrix/client/v3/profile/",
            }
        ]
    }
    write_configmap(directory, {"policy.yaml": yaml.safe_dump(site)}, 2)
    wait_until(
        lambda: route(p, "GET", profile)[1].get("class") == "client_reader",
        15,
        "the agent to apply the updated ConfigMap",
    )
    assert route(p, "GET", profile)[2]["rule"] == "profile_reads"


HASHED_SAMPLES = {
    worker_class: one_per_key(kind, 100, seed=24) for worker_class, kind in HASHED.items()
}


def placement(pod: Pod) -> dict[str, list[str]]:
    """The worker address each request of :data:`HASHED_SAMPLES` reached through ``pod``."""
    placed: dict[str, list[str]] = {}
    for worker_class, requests in HASHED_SAMPLES.items():
        # One at a time on one connection: bounded load never moves a key.
        client = Client(pod.port("haproxy", "http"), pod.ip)
        try:
            outcomes = [client.send(r) for r in requests]
        finally:
            client.close()
        assert {(o.status, o.worker_class) for o in outcomes} == {(200, worker_class)}
        placed[worker_class] = [o.address for o in outcomes]
    return placed


def slot_addresses(pod: Pod, worker_class: str, up: bool = False) -> dict[str, str]:
    """The address each server slot of ``be_<worker_class>`` holds (empty slots left out;
    with ``up``, only the slots UP)."""
    status, _, body = pod.get(pod.port("haproxy", "stats"), "/stats;csv")
    if status != 200:
        return {}
    rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
    return {
        row["svname"]: row["addr"]
        for row in rows
        if row["pxname"] == f"be_{worker_class}"
        and row["svname"].startswith("w")
        and row["addr"]
        and (not up or row["status"].startswith("UP"))
    }


def follows(pod: Pod, cluster: Cluster, strictly: bool = False) -> bool:
    """Whether ``pod`` has the hashed classes' running workers UP (``strictly``: those
    only, and no slot left holding a deleted one)."""
    for worker_class in HASHED:
        running = {f"{w.spec.host}:{w.port}" for w in cluster.workers[worker_class]}
        up = set(slot_addresses(pod, worker_class, up=True).values())
        if not strictly and not running <= up:
            return False
        if strictly and not up == set(slot_addresses(pod, worker_class).values()) == running:
            return False
    return True


def test_a_second_router_pod_started_after_a_rolling_restart_routes_every_key_as_the_first(
    pod: tuple[Pod, Cluster], network: Network, tmp_path: Path
) -> None:
    first, cluster = pod
    # Four pods a class on addresses of their own, as a Deployment's pods have.
    hosts = iter(range(10, 200))
    for worker_class in HASHED:
        for _ in range(4):
            cluster.add(worker_class, network.add_address(next(hosts)), 8008)
        cluster.publish(worker_class)
    wait_until(
        lambda: follows(first, cluster, strictly=True), 30, "the first router to find the pods"
    )
    # A rolling restart the first router lives through: a new pod per class,
    # UP, then an old one deleted, until none is left.
    for _ in range(len(cluster.workers["synchrotron"])):
        old = {c: cluster.workers[c][0] for c in HASHED}
        for worker_class in HASHED:
            cluster.add(worker_class, network.add_address(next(hosts)), 8008)
            cluster.publish(worker_class)
        wait_until(lambda: follows(first, cluster), 30, "the new pods UP")
        for worker_class, worker in old.items():
            cluster.remove(worker_class, worker)
    wait_until(
        lambda: follows(first, cluster, strictly=True),
        40,
        "the first router to free the slots of the deleted pods (hold obsolete)",
    )
    second = start_pod(network, 4, cluster.host_ip, first.documents, tmp_path / "second")
    try:
        wait_until(
            lambda: follows(second, cluster, strictly=True),
            30,
            "the second router to find the pods",
        )
        assert any(slot_addresses(first, c) != slot_addresses(second, c) for c in HASHED), (
            "both routers hold the pods in the same slots: the histories did not diverge"
        )
        expected = placement(first)
        by_agent = placement(second)
        second.procs["agent"].kill()
        second.procs["agent"].wait(10)
        wait_until(lambda: second.servers_up("be_spoa") == 0, 15, "its agent DOWN")
        by_fallback = placement(second)
        # On every version a router's fallback places keys where its agent does.
        assert by_fallback == by_agent
        if not haproxy_at_least(3, 0):
            met = {
                c: sum(a == b for a, b in zip(expected[c], by_agent[c], strict=True))
                for c in HASHED
            }
            pytest.xfail(
                f"HAProxy {haproxy_version()} has no hash-key: after a rolling restart, keys "
                f"of 100 on the same pod through both routers: {met}"
            )
        assert by_agent == expected
    finally:
        stop_pod(second)


def test_the_agent_killed_in_the_pod_leaves_routing_to_the_fallback(
    pod: tuple[Pod, Cluster],
) -> None:
    p, _ = pod
    p.procs["agent"].kill()
    p.procs["agent"].wait(10)
    wait_until(lambda: p.servers_up("be_spoa") == 0, 15, "HAProxy to mark the agent DOWN")
    # By the table the agent wrote into the pod's shared emptyDir: every
    # class, as the agent routed it.
    for worker_class, (method, path) in SAMPLES.items():
        status, document, logged = route(p, method, path)
        assert status == 200, (worker_class, status)
        assert document["class"] == worker_class
        assert logged["via"] == "fallback"


@pytest.fixture(scope="module")
def site_pod(
    network: Network, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Pod, Cluster]]:
    """deploy/kubernetes-site as shipped (namespace chat), with MAS."""
    overlay = site_overlay(tmp_path_factory.mktemp("site"), uncomment=("../kubernetes/mas",))
    documents = kustomize(overlay)
    with booted(network, documents, tmp_path_factory.mktemp("site-pod"), 201) as started:
        yield started


def test_a_site_in_namespace_chat_with_mas_is_routed_there(site_pod: tuple[Pod, Cluster]) -> None:
    p, cluster = site_pod
    assert p.env("haproxy")["SYNAPSE_NAMESPACE"] == "chat"
    assert cluster.domain == "chat.svc.cluster.local"
    # Only chat's names are in the cluster's DNS: every class is found there.
    samples = {**SAMPLES, "mas": ("POST", "/_matrix/client/v3/login")}
    for worker_class, (method, path) in samples.items():
        status, document, logged = route(p, method, path)
        assert status == 200, (worker_class, status)
        assert document["class"] == worker_class, (path, document)
        assert logged["via"] == "agent" and logged["srv"] == document["address"]
        # Main by synapse-main.chat.svc.cluster.local, the rest by their SRV records.
        pod_ip = cluster.main_ip if worker_class == "main" else cluster.host_ip
        assert document["address"].startswith(f"{pod_ip}:"), (worker_class, document)
    assert p.servers_up("be_mas") == 1
