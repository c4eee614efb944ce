"""What routing costs through real HAProxy: the agent and the fallback against native HAProxy.

Three configurations do the same job, side by side, in interleaved rounds of
one run, each for the same Matrix request mix:

  native    HAProxy alone, a regex map generated from the policy (each rule's
            paths, first match wins: what an operator deploys without the
            agent) and hashing on the Authorization header
  agent     the shipped haproxy.cfg and spoe-router.conf, with the agent
  fallback  the shipped haproxy.cfg with the agent down: HAProxy routes by the
            fallback map made from the policy

HAProxy and the agent run on CPU 0; the load generator (wrk, Debian's
package) and the backends (one more HAProxy answering as the workers) on CPU 1.
Loopback only, bounded in time. Prints per configuration requests/s, p50/p99
and the router core's CPU per request (HAProxy and the agent apart), then one
line per configuration:

  ratio agent/native 0.512

Requests per second move with whatever else the machine runs. With
``--callgrind N`` the native and fallback HAProxy (and the ``--also``
variants) run under valgrind's callgrind instead, and the bench counts the
instructions HAProxy spends on N requests of the same mix (after one pass of
the mix to warm it up), sent one after the other on one connection: a count
that is the same whatever the load beside it. It prints instructions per
request and their ratio native/fallback (user space only: the kernel's share,
the same for both, is not in it, so the ratio is a floor of what throughput
would show on an idle machine).

Usage:
    python bench/haproxy_e2e.py [--seconds 10] [--rounds 3] [--haproxy PATH]
                                [--connections 50] [--policy FILE]
                                [--conf DIR] [--also DIR ...] [--callgrind N]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.demo.ports import free_port  # noqa: E402
from spoa.demo.stack import Router, haproxy_binary, stop_process  # noqa: E402
from spoa.policy import load_policy  # noqa: E402
from spoa.traffic import Deployment, generate  # noqa: E402

T = TypeVar("T")
TICK = os.sysconf("SC_CLK_TCK")
ROUTER_CPU, LOAD_CPU = {0}, {1}


def cpu_seconds(pid: int) -> float:
    """User and system time of a process and all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


@dataclass
class AgentTraffic:
    """Decisions, socket reads and writes, and connections of the agent over a round."""

    decisions: int = 0
    reads: int = 0
    writes: int = 0
    accepted: int = 0
    #: Connections open at the end of the round.
    open: int = 0

    @classmethod
    def now(cls, pid: int, http: str) -> AgentTraffic:
        io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        with urllib.request.urlopen(f"http://{http}/status.json", timeout=5) as response:
            status = json.loads(response.read())
        return cls(
            int(status["decisions_total"]),
            int(io["syscr"]),
            int(io["syscw"]),
            int(status["connections"]["accepted"]),
            int(status["connections"]["open"]),
        )

    def since(self, before: AgentTraffic) -> AgentTraffic:
        return AgentTraffic(
            self.decisions - before.decisions,
            self.reads - before.reads,
            self.writes - before.writes,
            self.accepted - before.accepted,
            self.open,
        )


@dataclass
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    haproxy_cpu: float
    agent_cpu: float
    #: Requests the agent configuration's HAProxy logged as routed by the fallback.
    via_fallback: int = 0
    #: The agent's side of the round: what HAProxy's SPOE traffic looks like.
    agent: AgentTraffic | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


@dataclass
class Config:
    name: str
    port: int
    haproxy_pid: int
    agent_pid: int | None = None
    #: The agent's HTTP address (status.json).
    agent_http: str | None = None
    #: HAProxy's log (the shipped log-format: via=agent|fallback per request).
    log: Path | None = None
    #: callgrind's output file, with --callgrind.
    callgrind: Path | None = None
    results: list[Result] = field(default_factory=list)


class Loop:
    """An event loop on its own thread, for the DNS zone the routers resolve workers in."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)


def backends_config(workers: dict[str, list[tuple[str, int]]]) -> str:
    """One more HAProxy standing in for the workers: each answers with its name."""
    lines = ["global", "    nbthread 1", "defaults", "    mode http", "    timeout client 30s"]
    lines += ["    timeout server 30s", "    timeout connect 5s"]
    for worker_class, endpoints in workers.items():
        for name, port in endpoints:
            answer = f'{{"worker":"{name}","class":"{worker_class}"}}'
            lines += [
                f"frontend {name}",
                f"    bind 127.0.0.1:{port}",
                "    http-request return status 200 content-type application/json "
                f"string '{answer}'",
            ]
    return "\n".join(lines) + "\n"


def native_config(router: Router, map_file: Path, classes: tuple[str, ...]) -> str:
    """HAProxy without the agent: a regex map from the policy, the same backends and DNS."""
    env = router.haproxy_env()
    lines = [
        "global",
        "    log stdout format raw local0 info",
        f"resolvers dns\n    nameserver ns1 127.0.0.1:{router.dns_port}",
        "    hold valid 10s",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 5s",
        "    timeout client 180s",
        "    timeout server 180s",
        "frontend fe_native",
        f"    bind 127.0.0.1:{router.port}",
        "    option forwardfor",
        f"    use_backend be_%[path,map_reg({map_file},main)]",
        "    default_backend be_main",
    ]
    for worker_class in classes:
        lines += [
            f"backend be_{worker_class}",
            "    balance hdr(Authorization)",
            "    hash-type consistent",
        ]
        if worker_class == "main":
            lines.append(f"    server main {env['SYNAPSE_MAIN']}")
        else:
            lines.append(
                f"    server-template w 4 {env[_env(worker_class)]} check inter 2s "
                "resolvers dns init-addr none"
            )
    return "\n".join(lines) + "\n"


def _env(worker_class: str) -> str:
    return "SYNAPSE_" + re.sub(r"[^A-Za-z0-9]", "_", worker_class).upper()


def regex_map(policy_path: Path) -> str:
    """The policy's rules as an HAProxy regex map: first match wins, like the policy."""
    policy = load_policy(str(policy_path))
    lines = []
    for rule in policy.rules:
        if rule.spec is None:
            continue
        for pattern in rule.spec.paths:
            lines.append(f"{pattern} {rule.spec.worker_class}")
    return "\n".join(lines) + "\n"


def wrk_script(path: Path, count: int) -> None:
    """A wrk script that cycles through a realistic Matrix mix."""
    requests = []
    for request in generate(count, Deployment(users=200, rooms=50, remotes=20, seed=5)):
        headers = ", ".join(f'["{k}"] = "{v}"' for k, v in request.headers.items() if '"' not in v)
        body = '"{}"' if request.method in ("PUT", "POST") else "nil"
        target = request.target.replace('"', "%22")
        requests.append(f'  wrk.format("{request.method}", "{target}", {{{headers}}}, {body}),')
    path.write_text(
        "local requests = {\n"
        + "\n".join(requests)
        + "\n}\nlocal n = 0\nrequest = function()\n  n = n % #requests + 1\n"
        "  return requests[n]\nend\n"
    )


def run_wrk(port: int, script: Path, seconds: float, connections: int) -> tuple[str, float]:
    started = time.monotonic()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:.0f}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, LOAD_CPU),
    )
    return out.stdout, time.monotonic() - started


def _ms(text: str, label: str) -> float:
    match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def measure(config: Config, script: Path, seconds: float, connections: int) -> Result:
    haproxy_before = cpu_seconds(config.haproxy_pid)
    agent_before = cpu_seconds(config.agent_pid) if config.agent_pid else 0.0
    log_before = config.log.stat().st_size if config.log else 0
    agent = (
        (config.agent_pid, config.agent_http) if config.agent_pid and config.agent_http else None
    )
    traffic = AgentTraffic.now(*agent) if agent else None
    text, _ = run_wrk(config.port, script, seconds, connections)
    haproxy_cpu = cpu_seconds(config.haproxy_pid) - haproxy_before
    agent_cpu = (cpu_seconds(config.agent_pid) - agent_before) if config.agent_pid else 0.0
    if agent and traffic:
        traffic = AgentTraffic.now(*agent).since(traffic)
    via_fallback = 0
    if config.log:
        time.sleep(0.5)  # HAProxy writes a request's line after its response
        with config.log.open("rb") as handle:
            handle.seek(log_before)
            via_fallback = handle.read().count(b" via=fallback ")
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", text)
    if not total:
        raise SystemExit(f"unexpected wrk output:\n{text}")
    requests = int(total.group(1))
    errors = 0
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        errors += int(match.group(1))
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        errors += sum(int(n) for n in match.groups())
    return Result(
        requests,
        seconds,
        _ms(text, "50%"),
        _ms(text, "99%"),
        errors,
        haproxy_cpu,
        agent_cpu,
        via_fallback,
        traffic,
    )


CALLGRIND = ("valgrind", "--tool=callgrind", "--instr-atstart=no", "-q")


def callgrind_prefix(out: Path) -> tuple[str, ...]:
    """Run a command under callgrind, counting nothing until told to (callgrind_control -i on)."""
    return (*CALLGRIND, f"--callgrind-out-file={out}")


def send_requests(port: int, requests: list[Any]) -> int:
    """Send ``requests`` one after the other on a kept-alive connection; the non-200 answers."""
    errors = 0
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for request in requests:
            body = b"{}" if request.method in ("PUT", "POST") else None
            connection.request(request.method, request.target, body, dict(request.headers))
            response = connection.getresponse()
            response.read()
            errors += response.status != 200
            if response.will_close:
                connection.close()
    finally:
        connection.close()
    return errors


def count_instructions(config: Config, requests: list[Any]) -> tuple[int, int]:
    """HAProxy's instructions on ``requests``, once warmed by them, and the non-200 answers.

    HAProxy is stopped after: callgrind writes its counts when the process ends.
    """
    assert config.callgrind is not None
    send_requests(config.port, requests)
    instrument(config.haproxy_pid, "on")
    errors = send_requests(config.port, requests)
    instrument(config.haproxy_pid, "off")
    os.kill(config.haproxy_pid, signal.SIGTERM)
    wait(lambda: _ended(config.haproxy_pid), 120, f"{config.name} HAProxy to end")
    return callgrind_total(config.callgrind), errors


def instrument(pid: int, state: str) -> None:
    """Turn callgrind's counting on or off in a running process (it exits 0 even when it fails)."""
    out = subprocess.run(
        ["callgrind_control", "-i", state, str(pid)], capture_output=True, text=True, check=False
    )
    if "OK." not in out.stdout:
        raise SystemExit(f"callgrind_control -i {state} {pid} failed:\n{out.stdout}{out.stderr}")


def _ended(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


def callgrind_total(out: Path) -> int:
    """The instructions (Ir) of a callgrind output file."""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def servers_up(stats_port: int, backend: str) -> int:
    url = f"http://127.0.0.1:{stats_port}/stats;csv"
    with urllib.request.urlopen(url, timeout=5) as response:
        rows = response.read().decode().splitlines()
    count = 0
    for row in rows:
        fields = row.split(",")
        server = fields[1] if len(fields) > 17 else ""
        if fields[0] == backend and server not in ("", "BACKEND", "FRONTEND", "main"):
            count += fields[17] == "UP"
    return count


def report_instructions(configs: list[Config], count: int, version: str) -> int:
    """--callgrind: HAProxy's instructions per request of each configuration."""
    mix = list(generate(count, Deployment(users=200, rooms=50, remotes=20, seed=5)))
    print(
        f"haproxy_e2e --callgrind: {version.splitlines()[0]}; {count} requests of the mix, "
        "one connection, after one pass to warm up"
    )
    per_request: dict[str, float] = {}
    for config in configs:
        total, errors = count_instructions(config, mix)
        per_request[config.name] = total / count
        print(
            f"{config.name:10} {per_request[config.name]:10.0f} instructions per request "
            f"(HAProxy, user space)  errors {errors}"
        )
    native = per_request["native"]
    for name, cost in per_request.items():
        if name != "native":
            print(f"ratio native/{name} {native / cost:.3f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--haproxy", help="the HAProxy binary (default: the system's)")
    parser.add_argument("--policy", default=str(ROOT / "policies" / "synapse-workers.yaml"))
    parser.add_argument(
        "--conf",
        metavar="DIR",
        help="the agent and fallback configurations load DIR/haproxy.cfg and "
        "DIR/spoe-router.conf instead of haproxy/ (to compare HAProxy settings)",
    )
    parser.add_argument(
        "--also",
        metavar="DIR",
        action="append",
        default=[],
        help="one more fallback configuration, from DIR/haproxy.cfg (and DIR's other files: "
        "DIR is laid out as haproxy/), measured in the same rounds as fallback-<name of DIR> "
        "(repeatable: variants side by side)",
    )
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="N",
        help="count HAProxy's instructions on N requests under valgrind (native, fallback "
        "and the --also variants) instead of measuring requests/s",
    )
    parser.add_argument(
        "--callgrind-out",
        metavar="DIR",
        help="keep callgrind's output files in DIR (NAME.callgrind, for callgrind_annotate)",
    )
    args = parser.parse_args()
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("haproxy_e2e: --callgrind needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    if shutil.which("wrk") is None:
        print("haproxy_e2e: needs wrk (apt-get install wrk)", file=sys.stderr)
        return 2
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        print("haproxy_e2e: needs two CPUs (one for the router, one for the load)", file=sys.stderr)
        return 2
    if args.haproxy:
        os.environ["SPOA_HAPROXY"] = args.haproxy
    binary = haproxy_binary()
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    policy = Path(args.policy)
    classes = load_policy(str(policy)).classes
    workdir = Path(tempfile.mkdtemp(prefix="spoa-haproxy-e2e-"))
    loop = Loop()
    procs: list[subprocess.Popen[bytes]] = []
    routers: list[Router] = []
    try:
        # The workers: two per class (main one), all in one HAProxy on the load CPU.
        workers = {
            c: [(f"{c}-{n}", free_port()) for n in range(1, 2 if c == "main" else 3)]
            for c in classes
        }
        (workdir / "backends.cfg").write_text(backends_config(workers))
        os.sched_setaffinity(0, LOAD_CPU)
        procs.append(
            subprocess.Popen(
                [binary, "-db", "-f", str(workdir / "backends.cfg")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        configs: list[Config] = []
        variants = {f"fallback-{Path(d).name}": Path(d).resolve() for d in args.also}
        names = ("native", "fallback") if args.callgrind else ("native", "agent", "fallback")
        # Under valgrind, HAProxy starts and answers its first checks slowly.
        up_timeout = 180 if args.callgrind else 30
        for name in (*names, *variants):
            out = workdir / f"{name}.callgrind" if args.callgrind else None
            prefix = callgrind_prefix(out) if out is not None else ()
            router = Router(
                workdir=workdir / name,
                policy=policy,
                port=free_port(),
                stats_port=free_port(),
                agent_port=free_port(),
                agent_http=f"127.0.0.1:{free_port()}",
            )
            router.main_address = f"127.0.0.1:{workers['main'][0][1]}"
            if args.conf:
                router.haproxy_dir = Path(args.conf).resolve()
            if name in variants:
                router.haproxy_dir = variants[name]
            router.haproxy_prefix = prefix
            loop.call(router.start_dns())
            for worker_class, endpoints in workers.items():
                if worker_class != "main":
                    router.publish(worker_class, endpoints)
            routers.append(router)
            os.sched_setaffinity(0, ROUTER_CPU)  # HAProxy and the agent inherit it
            if name == "native":
                (router.workdir / "paths.map").write_text(regex_map(policy))
                (router.workdir / "native.cfg").write_text(
                    native_config(router, router.workdir / "paths.map", classes)
                )
                log = (router.workdir / "haproxy.log").open("ab")
                proc = subprocess.Popen(
                    [*prefix, binary, "-db", "-f", str(router.workdir / "native.cfg")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                procs.append(proc)
                configs.append(Config(name, router.port, proc.pid, callgrind=out))
            else:
                if name == "agent":
                    router.start_agent()
                router.start_haproxy()
                assert router.haproxy is not None
                agent_pid = router.agent.pid if router.agent is not None else None
                logged = router.workdir / "haproxy.log"
                configs.append(
                    Config(
                        name,
                        router.port,
                        router.haproxy.pid,
                        agent_pid,
                        router.agent_http if agent_pid else None,
                        logged,
                        out,
                    )
                )
                stats = router.stats_port
                wanted = 1 if name == "agent" else 0
                wait(
                    lambda s=stats, w=wanted: servers_up(s, "be_spoa") == w,
                    up_timeout,
                    f"{name} agent",
                )
                wait(
                    lambda s=stats: servers_up(s, "be_synchrotron") == 2,
                    up_timeout,
                    f"{name} workers",
                )
            os.sched_setaffinity(0, LOAD_CPU)
        time.sleep(3)  # the native router's checks
        if args.callgrind:
            return report_instructions(configs, args.callgrind, version.stdout)
        script = workdir / "mix.lua"
        wrk_script(script, 5000)
        print(
            f"haproxy_e2e: {version.stdout.splitlines()[0]}; {args.rounds} rounds of "
            f"{args.seconds:.0f} s, {args.connections} connections; load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
        )
        for n in range(args.rounds):
            for config in configs:
                result = measure(config, script, args.seconds, args.connections)
                config.results.append(result)
                print(
                    f"  round {n + 1} {config.name:8} {result.rate:9.0f} req/s  p50 "
                    f"{result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                    + (
                        f"  via fallback {result.via_fallback / result.requests:.1%}"
                        if config.name == "agent"
                        else ""
                    )
                )
                if result.agent is not None:
                    a = result.agent
                    print(
                        f"           agent: {a.decisions / max(a.reads, 1):.1f} NOTIFYs per "
                        f"read, {a.decisions / max(a.writes, 1):.1f} per write, "
                        f"{a.open} connections open, {a.accepted} opened in the round"
                    )
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        rates: dict[str, float] = {}
        for config in configs:
            results = config.results
            requests = sum(r.requests for r in results)
            rates[config.name] = statistics.median(r.rate for r in results)
            haproxy_us = sum(r.haproxy_cpu for r in results) / requests * 1e6
            agent_us = sum(r.agent_cpu for r in results) / requests * 1e6
            print(
                f"{config.name:8} {rates[config.name]:9.0f} req/s (median)  p50 "
                f"{statistics.median(r.p50_ms for r in results):.2f} ms  p99 "
                f"{statistics.median(r.p99_ms for r in results):.2f} ms  CPU per request: "
                f"HAProxy {haproxy_us:.1f} us, agent {agent_us:.1f} us  errors "
                f"{sum(r.errors for r in results)}"
            )
        for name in ("agent", "fallback", *variants):
            print(f"ratio {name}/native {rates[name] / rates['native']:.3f}")
        return 0
    finally:
        for router in routers:
            router.stop_router()
        for proc in procs:
            stop_process(proc)
        if args.callgrind_out:
            Path(args.callgrind_out).mkdir(parents=True, exist_ok=True)
            for out in workdir.glob("*.callgrind"):
                shutil.copy(out, Path(args.callgrind_out) / out.name)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
