"""The whole router on one machine: HAProxy, the agent and demo workers on loopback.

:class:`DemoStack` starts, with the shipped ``haproxy/haproxy.cfg`` unchanged:
demo workers for every class of a policy (ports chosen at run time), a DNS
server publishing them as SRV records (as a Kubernetes headless service
would), ``spoa serve`` with the policy, and HAProxy configured through its
environment variables. ``spoa demo`` drives it for people; the integration
tests drive the very same code.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import DEFAULT_HTTP
from ..fallback import publish
from ..policy import load_policy
from .dns import Zone, serve_dns
from .workers import DemoWorker, WorkerSpec

ZONE = "spoa.test"
REPO = Path(__file__).resolve().parents[2]

#: Workers per class in the demo; classes not listed get one.
DEFAULT_COUNTS: Mapping[str, int] = {
    "synchrotron": 3,
    "initial_sync": 2,
    "client_reader": 2,
    "event_creator": 3,
    "federation_reader": 2,
    "federation_inbound": 3,
    "receipts": 2,
    "device_lists": 2,
    "sync": 3,
    "generic": 3,
}


class StackError(RuntimeError):
    """Something the demo needs is missing or failed to start."""


def haproxy_binary() -> str:
    """``$SPOA_HAPROXY`` if set (another build: ./dev.sh haproxy 3.4.0), else the system's."""
    chosen = os.environ.get("SPOA_HAPROXY")
    if chosen:
        if not os.access(chosen, os.X_OK):
            raise StackError(f"SPOA_HAPROXY={chosen} is not an executable")
        return chosen
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
    )
    if found is None:
        raise StackError(
            "HAProxy is not installed. On Debian or Ubuntu: apt-get install haproxy "
            "(./dev.sh run does it for you when run as root or with sudo)."
        )
    return found


def haproxy_version() -> str:
    """The version of :func:`haproxy_binary`, as ``haproxy -v`` prints it (``2.6.12-1+deb12u4``)."""
    out = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True, check=True)
    return out.stdout.split()[2]


def haproxy_at_least(major: int, minor: int) -> bool:
    """Whether :func:`haproxy_binary` is version ``major.minor`` or later."""
    numbers = re.match(r"(\d+)\.(\d+)", haproxy_version())
    if numbers is None:
        raise StackError(f"cannot read HAProxy's version from {haproxy_version()!r}")
    return (int(numbers.group(1)), int(numbers.group(2))) >= (major, minor)


def stop_process(
    proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Signal a child if it still runs and wait for it; kill it if it will not stop."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def service_name(worker_class: str) -> str:
    """The SRV name a class's workers are published under."""
    return f"_http._tcp.{worker_class.replace('_', '-')}.{ZONE}"


def pod_name(worker: str) -> str:
    """The DNS name a worker is published under (an SRV target)."""
    return f"{worker.replace('_', '-')}.{ZONE}"


def env_name(worker_class: str) -> str:
    """The haproxy.cfg variable naming a class's workers: SYNAPSE_<CLASS>."""
    return "SYNAPSE_" + re.sub(r"[^A-Za-z0-9]", "_", worker_class).upper()


@dataclass
class Router:
    """HAProxy (the shipped configuration), the agent and a DNS zone for the workers.

    Whoever runs workers publishes them with :meth:`publish`; every port is on
    127.0.0.1. :class:`DemoStack` adds demo workers; the end-to-end tests add
    real Synapse processes.
    """

    workdir: Path
    policy: Path
    port: int = 8008
    stats_port: int = 8404
    agent_port: int = 12345
    #: The agent's HTTP endpoint (metrics, status page); port 0 picks one.
    agent_http: str = DEFAULT_HTTP
    check_inter: str = "1s"
    poll_interval: float = 1.0
    haproxy_dir: Path = REPO / "haproxy"
    #: HOST:PORT of the main process.
    main_address: str = ""
    zone: Zone = field(default_factory=Zone)
    #: SYNAPSE_<CLASS> for the classes not found by their SRV name: HOST:PORT,
    #: a name whose A records are the workers (as compose publishes replicas).
    worker_names: dict[str, str] = field(default_factory=dict)
    #: More of HAProxy's environment (SPOA_ADMIN_SOCKET, ...).
    environment: dict[str, str] = field(default_factory=dict)
    #: Whether being up means the agent UP too (False: HAProxy routes alone).
    expect_agent: bool = True
    #: More arguments of the agent's ``spoa serve`` (--record, --shadow, ...).
    agent_args: tuple[str, ...] = ()
    #: A command HAProxy runs under (valgrind, for the instruction counts of the bench).
    haproxy_prefix: tuple[str, ...] = ()
    agent: subprocess.Popen[bytes] | None = None
    haproxy: subprocess.Popen[bytes] | None = None
    classes: tuple[str, ...] = ()
    _dns: asyncio.DatagramTransport | None = None
    dns_port: int = 0

    @property
    def fallback_map(self) -> Path:
        """The fallback's map: written here before HAProxy starts, then by the agent."""
        return self.workdir / "fallback.map"

    @property
    def admin_socket(self) -> Path:
        """HAProxy's runtime API, through which the agent pushes each policy's map."""
        return self.workdir / "haproxy.sock"

    async def start_dns(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        policy = load_policy(str(self.policy))
        self.classes = policy.classes
        # HAProxy's fallback has a map before the agent first runs; the
        # agent rewrites it for every policy it loads.
        publish(policy, self.fallback_map)
        self._dns, self.dns_port = await serve_dns(self.zone)

    def publish(self, worker_class: str, endpoints: list[tuple[str, int]]) -> None:
        """Publish a class's workers, ``(name, port)`` on 127.0.0.1, as SRV records."""
        self.publish_at(worker_class, [(name, "127.0.0.1", port) for name, port in endpoints])

    def publish_at(self, worker_class: str, endpoints: list[tuple[str, str, int]]) -> None:
        """Publish a class's workers, ``(name, address, port)``, as SRV records, in that order."""
        self.zone.set_service(
            service_name(worker_class),
            [(pod_name(name), address, port) for name, address, port in endpoints],
        )

    def start_agent(self) -> None:
        log = (self.workdir / "agent.log").open("ab")
        command = [
            sys.executable,
            "-m",
            "spoa",
            "serve",
            "--policy",
            str(self.policy),
            "--listen",
            f"127.0.0.1:{self.agent_port}",
            "--poll-interval",
            str(self.poll_interval),
            "--fallback-map",
            str(self.fallback_map),
            "--haproxy-socket",
            str(self.admin_socket),
            "--http",
            self.agent_http,
            *self.agent_args,
        ]
        self.agent = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.agent, sig, timeout=15)

    def haproxy_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SPOA_BIND=f"127.0.0.1:{self.port}",
            SPOA_STATS_BIND=f"127.0.0.1:{self.stats_port}",
            SPOA_AGENT=f"127.0.0.1:{self.agent_port}",
            SPOA_CONF_DIR=str(self.haproxy_dir),
            SPOA_DNS=f"127.0.0.1:{self.dns_port}",
            SPOA_CHECK_INTER=self.check_inter,
            SYNAPSE_MAIN=self.main_address,
        )
        env["SPOA_FALLBACK_MAP"] = str(self.fallback_map)
        env["SPOA_ADMIN_SOCKET"] = str(self.admin_socket)
        for worker_class in self.classes:
            if worker_class != "main":
                env[env_name(worker_class)] = self.worker_names.get(
                    worker_class, service_name(worker_class)
                )
        env.update(self.environment)
        return env

    def start_haproxy(self) -> None:
        binary = haproxy_binary()
        config = str(self.haproxy_dir / "haproxy.cfg")
        check = subprocess.run(
            [binary, "-c", "-q", "-f", config],
            env=self.haproxy_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            raise StackError(f"haproxy -c failed:\n{check.stdout}{check.stderr}")
        log = (self.workdir / "haproxy.log").open("ab")
        self.haproxy = subprocess.Popen(
            [*self.haproxy_prefix, binary, "-db", "-f", config],
            env=self.haproxy_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()

    async def stop(self) -> None:
        self.stop_router()

    def stop_router(self) -> None:
        stop_process(self.haproxy)
        self.stop_agent()
        if self._dns is not None:
            self._dns.close()
            self._dns = None

    # -- state ---------------------------------------------------------------------

    def stats(self) -> list[dict[str, str]]:
        """HAProxy's stats CSV, one dict per proxy or server."""
        url = f"http://127.0.0.1:{self.stats_port}/stats;csv"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return list(csv.DictReader(io.StringIO(text.lstrip("# "))))

    def server_states(self) -> dict[tuple[str, str], str]:
        return {(row["pxname"], row["svname"]): row["status"] for row in self.stats()}

    def up(self, expected: Mapping[str, int]) -> bool:
        """The agent and main UP, and at least ``expected[c]`` workers UP in be_<c>."""
        try:
            states = self.server_states()
        except OSError:
            return False
        if self.expect_agent and states.get(("be_spoa", "agent1")) != "UP":
            return False
        if states.get(("be_main", "main")) != "UP":
            return False
        for worker_class, count in expected.items():
            up = sum(
                1
                for (backend, server), status in states.items()
                if backend == f"be_{worker_class}" and server.startswith("w") and status == "UP"
            )
            if up < count:
                return False
        return True

    async def wait_up(self, expected: Mapping[str, int], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in (("HAProxy", self.haproxy), ("the agent", self.agent)):
                if proc is not None and proc.poll() is not None:
                    log = self.workdir / ("haproxy.log" if name == "HAProxy" else "agent.log")
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise StackError(f"{name} exited with status {proc.returncode}:\n{tail}")
            if await asyncio.to_thread(self.up, expected):
                return
            await asyncio.sleep(0.2)
        raise StackError(f"not ready after {timeout:.0f}s; see {self.workdir}/haproxy.log")


@dataclass
class DemoStack(Router):
    """The router with demo workers for every class of the policy."""

    counts: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    workers: dict[str, list[DemoWorker]] = field(default_factory=dict)
    main: DemoWorker | None = None

    async def start(self) -> None:
        haproxy_binary()  # fail early, with the install hint
        await self.start_dns()
        self.main = await DemoWorker(WorkerSpec("main-1", "main", "127.0.0.1", 0)).start()
        self.main_address = f"127.0.0.1:{self.main.port}"
        for worker_class in self.classes:
            if worker_class != "main":
                await self.start_class(worker_class)
        self.start_agent()
        self.start_haproxy()

    async def start_class(self, worker_class: str) -> list[DemoWorker]:
        """Start (again) a class's workers on their previous ports, or new ones."""
        previous = self.workers.get(worker_class, [])
        count = self.counts.get(worker_class, 1)
        workers = []
        for n in range(1, count + 1):
            port = previous[n - 1].port if len(previous) >= n else 0
            spec = WorkerSpec(f"{worker_class}-{n}", worker_class, "127.0.0.1", port)
            workers.append(await DemoWorker(spec).start())
        self.workers[worker_class] = workers
        self.publish(worker_class, [(w.spec.name, w.port) for w in workers])
        return workers

    async def stop_class(self, worker_class: str) -> None:
        """Stop a class's workers; their DNS records stay, as with crashed pods."""
        for worker in self.workers.get(worker_class, []):
            await worker.stop()

    async def stop(self) -> None:
        self.stop_router()
        for worker_class in list(self.workers):
            await self.stop_class(worker_class)
        if self.main is not None:
            await self.main.stop()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await self.wait_up({c: len(w) for c, w in self.workers.items()}, timeout)
