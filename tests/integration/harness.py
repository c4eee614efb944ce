"""Real processes on loopback for integration tests: HAProxy, agents, HTTP backends.

Everything binds to 127.0.0.1 on ports chosen at run time, writes into a
temporary directory, and is stopped by the test that started it.
"""

from __future__ import annotations

import http.client
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from spoa.demo.stack import haproxy_binary, stop_process

ROOT = Path(__file__).resolve().parents[2]


#: A test SPOE configuration: the shipped one's settings, with the processing
#: timeout a test needs to tell "waited for the agent" from "did not".
TEST_SPOE = """\
[router]
spoe-agent router
    messages route
    option var-prefix route
    option set-on-error err
    register-var-names backend key rule policy
    no option async
    no option send-frag-payload
    timeout hello 500ms
    timeout idle 30s
    timeout processing {processing}
    use-backend be_spoa

spoe-message route
    args method=method path=path query=query auth=req.fhdr(authorization) src=src
    event on-frontend-http-request
"""

_TEST_CONFIG = """\
global
    stats socket {workdir}/admin.sock mode 600 level admin
    log stdout format raw local0 info

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 10s
    timeout server 10s

frontend fe_matrix
{binds}
    filter spoe engine router config {workdir}/spoe.conf
    http-response set-header X-Route-Backend %[var(txn.route.backend)]
    http-response set-header X-Route-Rule %[var(txn.route.rule)]
    http-response set-header X-Route-Policy %[var(txn.route.policy)]
    use_backend be_%[var(txn.route.backend)]
    default_backend be_main

{backends}

backend be_spoa
    mode tcp
    option spop-check
    timeout connect 500ms
    timeout server 1m
    server agent 127.0.0.1:{agent_port} check inter 200ms fall 2 rise 1
"""


def routing_config(
    workdir: Path,
    port: int,
    agent_port: int,
    backends: str,
    addresses: Sequence[str] = ("127.0.0.1",),
) -> str:
    """A test HAProxy: SPOE filter, dynamic use_backend, route variables as headers."""
    binds = "\n".join(f"    bind {address}:{port}" for address in addresses)
    return _TEST_CONFIG.format(
        workdir=workdir, binds=binds, backends=backends, agent_port=agent_port
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# -- HTTP backends standing in for Synapse workers ------------------------------------------


class _Backend(BaseHTTPRequestHandler):
    server: _BackendServer

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = f"{self.server.label}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", self.server.label)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = do_DELETE = _answer  # noqa: N815 (http.server's names)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    label = ""


@dataclass
class Backend:
    label: str
    port: int
    server: _BackendServer


@contextmanager
def http_backends(labels: Sequence[str]) -> Iterator[dict[str, Backend]]:
    """One HTTP server per label; each answers every request with its label."""
    backends: dict[str, Backend] = {}
    try:
        for label in labels:
            server = _BackendServer(("127.0.0.1", 0), _Backend)
            server.label = label
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            ).start()
            backends[label] = Backend(label, server.server_address[1], server)
        yield backends
    finally:
        stoppers = [
            threading.Thread(target=backend.server.shutdown) for backend in backends.values()
        ]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        for backend in backends.values():
            backend.server.server_close()


# -- agents -------------------------------------------------------------------------------


class AgentProcess:
    """An agent started as its own process; its SPOP address read from its log."""

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def start(self, timeout: float = 20.0) -> AgentProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *self.args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening for SPOP on (\S+)", text)
            if found:
                self.address = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"agent did not start within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- HAProxy ------------------------------------------------------------------------------


class HAProxy:
    """``haproxy -db`` on a configuration written to ``workdir``."""

    def __init__(self, workdir: Path, config: str, spoe: str | None = None) -> None:
        self.workdir = workdir
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config)
        if spoe is not None:
            (workdir / "spoe.conf").write_text(spoe)
        self.log_path = workdir / "haproxy.log"
        self.admin_socket = workdir / "admin.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        result = subprocess.run(
            [haproxy_binary(), "-c", "-f", str(self.config_path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def start(self, port: int) -> HAProxy:
        self.check()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(self.config_path)],
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        # Another process may hold the port a moment (a free port is only free
        # when picked): HAProxy then exits, and the port answers all the same.
        # Ready is this HAProxy alive, listening, and with its runtime API
        # socket when the configuration has one.
        wants_socket = f"stats socket {self.admin_socket} " in self.config_path.read_text()
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"HAProxy exited {proc.returncode}:\n{self.log()}")
            return port_open(port) and (not wants_socket or self.admin_socket.exists())

        wait_until(ready, 15, "HAProxy to listen")
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def admin(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_status(self, backend: str, server: str) -> str:
        """UP, DOWN, MAINT... as the stats CSV says."""
        lines = self.admin("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("pxname") == backend and row.get("svname") == server:
                return row["status"]
        raise KeyError(f"{backend}/{server} not in stats")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str]
    seconds: float


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        text = response.read().decode(errors="replace")
        return Response(
            response.status,
            text,
            {k.lower(): v for k, v in response.getheaders()},
            time.monotonic() - started,
        )
    finally:
        conn.close()
