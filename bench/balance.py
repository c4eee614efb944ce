"""How evenly a class's workers share its keys, and how many keys move when pods change.

For the hashed classes of the synapse-workers policy (users' syncs on the
sync workers, messages sent into rooms on the event creators, transactions
of remote servers on the inbound federation workers), through real HAProxy
with the agent, one configuration and one kind of discovery at a time:

  balance   N workers a class, K keys a class, one request each: the keys of
            the busiest and the idlest worker against the mean, on S sets of pod
            addresses (the median and the worst)
  moves     the share of keys that land on another worker after one pod is
            added, one removed, and one restarted on a new address, against
            the first placement (consistent hashing moves about 1/N)
  cost      the pods scaled from N to 2N and back to N: HAProxy's CPU time
            while it follows, against the same time idle; 1,000 ring changes
            through the runtime API (a server's weight set to 0 and back, each
            removing and putting back all of its points); HAProxy's memory

Pods are loopback addresses of their own on one port (spoa.demo.fleet), all
answered by one more HAProxy; each class's requests go one after another on
one pipelined connection, so bounded load (hash-balance-factor) never moves a
key and only the ring decides. Configurations: the shipped haproxy.cfg, and
with ``--git REV`` the haproxy.cfg of that revision too (before/after).

Usage:
    python bench/balance.py [--workers 8] [--keys 40000] [--sets 3] [--discovery srv,a]
                            [--git REV] [--config FILE ...] [--haproxy PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.demo.fleet import HASHED, Discovery, Fleet, Pod  # noqa: E402
from spoa.demo.ports import free_port  # noqa: E402
from spoa.demo.stack import Router, haproxy_binary, haproxy_version, stop_process  # noqa: E402
from spoa.traffic import TrafficRequest, one_per_key  # noqa: E402

POLICY = ROOT / "policies" / "synapse-workers.yaml"
TICK = os.sysconf("SC_CLK_TCK")
#: The stand-in answers on 127.0.1.1 to 127.0.1.250: the addresses the fleet gives.
STAND_IN_HOSTS = [f"127.0.1.{n}" for n in range(1, 251)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stand_in_config(port: int) -> str:
    """One HAProxy answering on every pod address: 200, and the address it answered on."""
    binds = "\n".join(f"    bind {host}:{port}" for host in STAND_IN_HOSTS)
    return (
        "global\n    nbthread 1\n"
        "defaults\n    mode http\n    timeout client 30s\n    timeout server 30s\n"
        "    timeout connect 5s\n"
        f"frontend pods\n{binds}\n"
        '    http-request return status 200 hdr X-Served-Address "%[dst]:%[dst_port]"\n'
    )


def _request_bytes(request: TrafficRequest) -> bytes:
    body = b"{}" if request.method in ("PUT", "POST") else b""
    head = [f"{request.method} {request.target} HTTP/1.1", "Host: bench"]
    head += [f"{name}: {value}" for name, value in request.headers.items()]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _pipelined(port: int, requests: list[TrafficRequest]) -> list[str]:
    """Every request on one connection, written ahead; the served address of each answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)

    async def write() -> None:
        for start in range(0, len(requests), 256):
            writer.write(b"".join(_request_bytes(r) for r in requests[start : start + 256]))
            await writer.drain()

    sender = asyncio.create_task(write())
    served: list[str] = []
    try:
        while len(served) < len(requests):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status = head.split(" ", 2)[1]
            length, address = 0, ""
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "x-served-address":
                    address = value.strip()
            if length:
                await reader.readexactly(length)
            if status != "200":
                raise SystemExit(f"balance: a request was answered {status}")
            served.append(address)
    finally:
        sender.cancel()
        writer.close()
    return served


def place(router: Router, requests: dict[str, list[TrafficRequest]]) -> dict[str, list[str]]:
    """Each class's requests through ``router``, classes side by side on a connection each."""

    async def all_classes() -> list[list[str]]:
        return await asyncio.gather(*(_pipelined(router.port, r) for r in requests.values()))

    return dict(zip(requests, asyncio.run(all_classes()), strict=True))


def balance(addresses: list[str], pods: list[Pod]) -> tuple[float, float]:
    counts = Counter(addresses)
    per_pod = [counts.get(p.address, 0) for p in pods]
    mean = len(addresses) / len(pods)
    return max(per_pod) / mean, min(per_pod) / mean


def moved(before: list[str], after: list[str]) -> float:
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


def runtime_api(socket_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def configuration(config: Path, workdir: Path, n: int) -> Path:
    """A directory laid out as haproxy/, with ``config`` as its haproxy.cfg."""
    directory = workdir / f"conf-{n}"
    shutil.copytree(ROOT / "haproxy", directory)
    shutil.copy(config, directory / "haproxy.cfg")
    return directory


def measure(
    label: str,
    conf: Path,
    discovery: Discovery,
    workers: int,
    sets: int,
    requests: dict[str, list[TrafficRequest]],
    workdir: Path,
    stand_in_port: int,
) -> None:
    fleet = Fleet(
        workdir / f"{label.replace(' ', '-')}-{discovery}",
        POLICY,
        discovery=discovery,
        serve=False,
        port=stand_in_port,
    )
    try:
        fleet.start_main()
        for worker_class in HASHED:
            for _ in range(workers):
                fleet.add_pod(worker_class)
        router = fleet.router("router")
        router.haproxy_dir = conf
        admin = router.workdir / "admin.sock"
        router.environment["SPOA_ADMIN_SOCKET"] = str(admin)
        fleet.show(router)
        started = time.monotonic()
        fleet.start(router)
        fleet.wait_settled(router)
        assert router.haproxy is not None
        pid = router.haproxy.pid
        weights = {s.weight for s in fleet.slots(router, "synchrotron") if s.address}
        print(
            f"\n{label}, {discovery.upper()} discovery: {workers} workers a class, "
            f"{len(next(iter(requests.values())))} keys a class; server weight {weights}; "
            f"HAProxy up in {time.monotonic() - started:.1f} s, {rss_mib(pid):.1f} MiB resident"
        )
        # With hash-key addr-port every set of pod addresses makes another
        # ring: the balance of several sets, each pod replaced by one on a new
        # address (with hash-key id, the slots make the same ring each time).
        figures: dict[str, list[tuple[float, float]]] = {c: [] for c in HASHED}
        for n in range(sets):
            if n:
                for pod in [p for c in HASHED for p in list(fleet.pods[c])]:
                    fleet.replace_pod(pod)
                fleet.show(router)
                fleet.wait_settled(router)
            first = place(router, requests)
            for worker_class, addresses in first.items():
                figures[worker_class].append(balance(addresses, fleet.pods[worker_class]))
        for worker_class, found in figures.items():
            highs = sorted(high for high, _ in found)
            lows = sorted(low for _, low in found)
            print(
                f"  balance {worker_class:19} ({HASHED[worker_class]:6}) "
                f"max/mean {highs[len(highs) // 2]:.3f} (worst {highs[-1]:.3f})  "
                f"min/mean {lows[len(lows) // 2]:.3f} (worst {lows[0]:.3f})"
                + (f"  medians of {sets} sets of addresses" if sets > 1 else "")
            )

        def moves(what: str, ideal: str, since: dict[str, list[str]]) -> dict[str, list[str]]:
            fleet.show(router)
            fleet.wait_settled(router)
            now = place(router, requests)
            shares = "  ".join(f"{c} {moved(since[c], now[c]):6.1%}" for c in HASHED)
            print(f"  moved on {what:24} {shares}   (1/N: {ideal})")
            return now

        # Each change against the placement just before it (be_event_creator
        # and be_federation_inbound have 8 slots: down first, then up).
        for pod in [fleet.pods[c][0] for c in HASHED]:
            fleet.remove_pod(pod)
        fewer = moves(f"a scale down ({workers} -> {workers - 1})", f"{1 / workers:.1%}", first)
        for worker_class in HASHED:
            fleet.add_pod(worker_class)
        again = moves(f"a scale up ({workers - 1} -> {workers})", f"{1 / workers:.1%}", fewer)
        for pod in [fleet.pods[c][workers // 2] for c in HASHED]:
            fleet.replace_pod(pod)
        moves("a restart, new address", f"{1 / workers:.1%}", again)

        # The ring's cost: N -> 2N -> N sync workers (16 slots), against the
        # same time idle.
        idle_from = cpu_seconds(pid)
        time.sleep(5)
        idle = (cpu_seconds(pid) - idle_from) / 5
        scale_from, clock = cpu_seconds(pid), time.monotonic()
        extra = [fleet.add_pod("synchrotron") for _ in range(workers)]
        fleet.show(router)
        fleet.wait_settled(router)
        up_seconds = time.monotonic() - clock
        for pod in extra:
            fleet.remove_pod(pod)
        fleet.show(router)
        fleet.wait_settled(router)
        span = time.monotonic() - clock
        scaling = cpu_seconds(pid) - scale_from
        print(
            f"  scale {workers} -> {2 * workers} -> {workers} sync workers: followed in "
            f"{up_seconds:.1f} s up, {span - up_seconds:.1f} s down (hold obsolete); "
            f"HAProxy CPU {scaling * 1000:.0f} ms, {(scaling - idle * span) * 1000:+.0f} ms "
            f"over idle; {rss_mib(pid):.1f} MiB resident"
        )
        servers = [s.name for s in fleet.slots(router, "synchrotron") if s.address]
        weight = max(weights)
        changes, cpu_from, clock = 0, cpu_seconds(pid), time.monotonic()
        while changes < 1000:
            for name in servers:
                for value in (0, weight):
                    runtime_api(admin, f"set server be_synchrotron/{name} weight {value}")
                    changes += 1
        cpu = cpu_seconds(pid) - cpu_from
        print(
            f"  {changes} ring changes by the runtime API (weight 0 and back): "
            f"{(time.monotonic() - clock) / changes * 1e6:.0f} us each, HAProxy CPU "
            f"{cpu / changes * 1e6:.0f} us each (the API's own work included)"
        )
    finally:
        fleet.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=8, help="pods a class (at most 8)")
    parser.add_argument("--keys", type=int, default=40000, help="keys a class")
    parser.add_argument(
        "--sets", type=int, default=3, help="sets of pod addresses the balance is measured on"
    )
    parser.add_argument("--discovery", default="srv,a", help="srv, a, or both (srv,a)")
    parser.add_argument("--git", metavar="REV", help="also haproxy/haproxy.cfg as of REV")
    parser.add_argument("--config", metavar="FILE", action="append", default=[])
    parser.add_argument("--haproxy", help="the HAProxy binary (default: the system's)")
    args = parser.parse_args()
    if not 2 <= args.workers <= 8:
        parser.error("--workers: 2 to 8 (be_event_creator has 8 slots, and 2N pods are run)")
    discoveries: list[Discovery] = []
    for name in args.discovery.split(","):
        if name not in ("srv", "a"):
            parser.error(f"--discovery: srv or a, not {name!r}")
        discoveries.append("srv" if name == "srv" else "a")
    if args.haproxy:
        os.environ["SPOA_HAPROXY"] = args.haproxy
    binary = haproxy_binary()
    workdir = Path(tempfile.mkdtemp(prefix="spoa-balance-"))
    configs: list[tuple[str, Path]] = [("shipped", ROOT / "haproxy" / "haproxy.cfg")]
    if args.git:
        old = workdir / f"git-{args.git}" / "haproxy.cfg"
        old.parent.mkdir()
        text = subprocess.run(
            ["git", "show", f"{args.git}:haproxy/haproxy.cfg"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        old.write_text(text)
        configs.insert(0, (f"haproxy.cfg of {args.git}", old))
    configs += [(str(Path(c)), Path(c).resolve()) for c in args.config]
    requests = {c: one_per_key(kind, args.keys, seed=40) for c, kind in HASHED.items()}
    stand_in = None
    try:
        port = free_port()
        (workdir / "stand-in.cfg").write_text(stand_in_config(port))
        stand_in = subprocess.Popen(
            [binary, "-db", "-f", str(workdir / "stand-in.cfg")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        print(
            f"balance: HAProxy {haproxy_version()}; load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
        )
        for n, (label, config) in enumerate(configs):
            conf = configuration(config, workdir, n)
            for discovery in discoveries:
                measure(label, conf, discovery, args.workers, args.sets, requests, workdir, port)
        return 0
    finally:
        stop_process(stand_in)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
