"""A real Synapse deployment with workers on loopback, for end-to-end tests.

PostgreSQL (a private cluster) and Redis from Debian's packages; Synapse from
PyPI in its own virtual environment (.venv-synapse, made by ./dev.sh test).
The main process and the workers are the shipped deploy/synapse/ files:
homeserver-workers.yaml merged into the suite's homeserver.yaml, one process
per file of workers/, with only what a machine decides replaced (ports,
bind addresses, instance_map hosts, Redis, the database, log files).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spoa.demo.ports import free_port
from spoa.demo.stack import stop_process
from spoa.synapsecfg import load_synapse
from tests.integration.harness import port_open, wait_until

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE_PYTHON = ROOT / ".venv-synapse" / "bin" / "python"
SERVER_NAME = "spoa.test"


DEPLOY = ROOT / "deploy" / "synapse"
HOMESERVER_FRAGMENT = DEPLOY / "homeserver-workers.yaml"
WORKER_FILES = sorted((DEPLOY / "workers").glob("*.yaml"))


@dataclass(frozen=True)
class WorkerDef:
    """One Synapse worker of deploy/synapse/: its name and the routing class it serves."""

    name: str
    worker_class: str
    #: Whether HAProxy sends it anything (a client, federation or media listener).
    routed: bool
    config: dict[str, Any]


def _workers() -> tuple[WorkerDef, ...]:
    deployment = load_synapse(str(HOMESERVER_FRAGMENT), [str(p) for p in WORKER_FILES])
    return tuple(
        WorkerDef(
            process.name,
            process.worker_class,
            process.serves("client", "federation", "media"),
            yaml.safe_load(Path(process.source).read_text()),
        )
        for process in deployment.workers
    )


#: The topology of the end-to-end suite: deploy/synapse/ as shipped.
WORKERS: Sequence[WorkerDef] = _workers()


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise RuntimeError(f"{name} not found: the end-to-end tests need Debian's postgresql package")


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run as the postgres user then."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@dataclass
class Postgres:
    port: int = field(default_factory=free_port)
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="spoa-pg-")))

    def start(self) -> None:
        data = self.directory / "data"
        if os.geteuid() == 0:
            os.chown(self.directory, pwd.getpwnam("postgres").pw_uid, -1)
        subprocess.run(
            _as_postgres(
                [
                    _binary("initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            _as_postgres(
                [
                    _binary("pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(self.directory / "log"),
                    "-w",
                    "-o",
                    f"-p {self.port} -k {self.directory} "
                    "-c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c synchronous_commit=off -c full_page_writes=off "
                    "-c max_connections=200",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-c",
                "CREATE DATABASE synapse ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' "
                "TEMPLATE template0",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def stop(self) -> None:
        subprocess.run(
            _as_postgres(
                [_binary("pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop"]
            ),
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Redis:
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: port_open(self.port), 15, "Redis to listen")

    def stop(self) -> None:
        stop_process(self.proc)


def _health(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@dataclass
class Synapse:
    """The main process and the workers of :data:`WORKERS`."""

    workdir: Path
    public_baseurl: str
    postgres: Postgres
    redis: Redis
    main_port: int = field(default_factory=free_port)
    main_replication_port: int = field(default_factory=free_port)
    ports: dict[str, int] = field(default_factory=dict)
    replication_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    shared_secret: str = field(default_factory=lambda: secrets.token_hex(16))

    def _listeners(self, name: str, listeners: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The shipped listeners on free loopback ports; records which port is which."""
        placed = []
        for shipped in listeners:
            listener = {**shipped, "port": free_port(), "bind_addresses": ["127.0.0.1"]}
            names = {n for r in listener.get("resources", []) for n in r.get("names", [])}
            if "replication" in names:
                self.replication_ports[name] = listener["port"]
            else:
                self.ports[name] = listener["port"]
            placed.append(listener)
        return placed

    def write_config(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shipped = yaml.safe_load(HOMESERVER_FRAGMENT.read_text())
        listeners = self._listeners("main", shipped.pop("listeners"))
        self.main_port = self.ports.pop("main")
        self.main_replication_port = self.replication_ports.pop("main")
        worker_listeners = {
            w.name: self._listeners(w.name, w.config["worker_listeners"]) for w in WORKERS
        }
        replication = {"main": self.main_replication_port, **self.replication_ports}
        instance_map = {
            name: {"host": "127.0.0.1", "port": replication[name]}
            for name in shipped.pop("instance_map")
        }
        shipped.pop("redis")
        config = {
            "server_name": SERVER_NAME,
            "public_baseurl": self.public_baseurl,
            "report_stats": False,
            "signing_key_path": str(self.workdir / "signing.key"),
            "media_store_path": str(self.workdir / "media"),
            "log_config": str(self._log_config("main")),
            "database": {
                "name": "psycopg2",
                "args": {
                    "user": "postgres",
                    "database": "synapse",
                    "host": "127.0.0.1",
                    "port": self.postgres.port,
                    "cp_min": 1,
                    "cp_max": 3,
                },
            },
            "redis": {"enabled": True, "host": "127.0.0.1", "port": self.redis.port},
            # matrix-nio downloads through the legacy /_matrix/media/v3 endpoints.
            "enable_authenticated_media": False,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "registration_shared_secret": self.shared_secret,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "url_preview_enabled": False,
            "presence": {"enabled": True},
            # The suite registers, logs in and sends quickly from one address.
            "rc_message": {"per_second": 1000, "burst_count": 1000},
            "rc_registration": {"per_second": 1000, "burst_count": 1000},
            "rc_login": {
                "address": {"per_second": 1000, "burst_count": 1000},
                "account": {"per_second": 1000, "burst_count": 1000},
                "failed_attempts": {"per_second": 1000, "burst_count": 1000},
            },
            "rc_joins": {
                "local": {"per_second": 1000, "burst_count": 1000},
                "remote": {"per_second": 1000, "burst_count": 1000},
            },
            "rc_presence": {"per_user": {"per_second": 1000, "burst_count": 1000}},
            "bcrypt_rounds": 4,
            # The shipped worker settings, as they are.
            **shipped,
            "listeners": listeners,
            "instance_map": instance_map,
        }
        (self.workdir / "homeserver.yaml").write_text(yaml.safe_dump(config))
        for worker in WORKERS:
            worker_config = {
                **worker.config,
                "worker_listeners": worker_listeners[worker.name],
                "worker_log_config": str(self._log_config(worker.name)),
            }
            if "media_store_path" in worker_config:  # the shipped one is a container's
                worker_config["media_store_path"] = str(self.workdir / "media")
            (self.workdir / f"{worker.name}.yaml").write_text(yaml.safe_dump(worker_config))

    def _log_config(self, name: str) -> Path:
        path = self.workdir / f"{name}.log.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "version": 1,
                    "formatters": {
                        "precise": {
                            "format": "%(asctime)s %(name)s %(levelname)s %(request)s %(message)s"
                        }
                    },
                    "filters": {
                        "context": {
                            "()": "synapse.logging.context.LoggingContextFilter",
                            "request": "",
                        }
                    },
                    "handlers": {
                        "file": {
                            "class": "logging.FileHandler",
                            "formatter": "precise",
                            "filters": ["context"],
                            "filename": str(self.workdir / f"{name}.log"),
                        }
                    },
                    "loggers": {
                        "synapse.access.http": {"level": "INFO"},
                        "synapse": {"level": "WARNING"},
                    },
                    "root": {"level": "WARNING", "handlers": ["file"]},
                    "disable_existing_loggers": False,
                }
            )
        )
        return path

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (self.workdir / f"{name}.out").open("ab")
        proc = subprocess.Popen(
            [str(SYNAPSE_PYTHON), "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        out.close()
        return proc

    def start(self) -> None:
        if not SYNAPSE_PYTHON.exists():
            raise RuntimeError("no .venv-synapse: the README's test command installs Synapse")
        self.write_config()
        config = str(self.workdir / "homeserver.yaml")
        subprocess.run(
            [str(SYNAPSE_PYTHON), "-m", "synapse.app.homeserver", "-c", config, "--generate-keys"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.procs["main"] = self._popen("main", ["synapse.app.homeserver", "-c", config])
        self._wait_healthy("main", self.main_port, 120)
        for worker in WORKERS:
            self.start_worker(worker.name)
        for worker in WORKERS:
            self._wait_healthy(worker.name, self.ports[worker.name], 120)

    def start_worker(self, name: str) -> None:
        self.procs[name] = self._popen(
            name,
            [
                "synapse.app.generic_worker",
                "-c",
                str(self.workdir / "homeserver.yaml"),
                "-c",
                str(self.workdir / f"{name}.yaml"),
            ],
        )

    def wait_worker(self, name: str, timeout: float = 120) -> None:
        self._wait_healthy(name, self.ports[name], timeout)

    def _wait_healthy(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                out = (self.workdir / f"{name}.out").read_text(errors="replace")[-3000:]
                raise AssertionError(f"Synapse {name} exited {proc.returncode}:\n{out}")
            if _health(port):
                return
            time.sleep(0.2)
        raise AssertionError(f"Synapse {name} not healthy after {timeout}s")

    def stop_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()

    def endpoints(self) -> dict[str, list[tuple[str, int]]]:
        """Worker class -> [(worker name, port)], for the router's DNS zone."""
        found: dict[str, list[tuple[str, int]]] = {}
        for worker in WORKERS:
            if worker.routed:
                found.setdefault(worker.worker_class, []).append(
                    (worker.name, self.ports[worker.name])
                )
        return found

    def rss_bytes(self) -> int:
        """Resident memory of every Synapse process."""
        total = 0
        for proc in self.procs.values():
            total += _rss(proc.pid)
        return total


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
