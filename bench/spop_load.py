"""Agent-only SPOP load generator: NOTIFY -> ACK throughput, latency and agent CPU.

Starts ``spoa serve`` (or connects to ``--connect``), opens several
connections, HELLOs like HAProxy 2.6 and keeps NOTIFY frames of the design's
``route`` message in flight (pipelined). Prints decisions per second, p50/p99
latency from NOTIFY written to ACK read, and the agent's CPU time per decision
(from /proc, so it does not depend on how fast this generator is).

Two modes:
  * closed loop (default): every connection keeps ``--window`` frames in
    flight; measures the agent's capacity;
  * open loop (``--rate N``): N frames per second spread over 1 ms ticks;
    measures latency at a given load.

    python bench/spop_load.py                      # capacity, agent on core 0
    python bench/spop_load.py --rate 75000         # latency at 75k/s
    python bench/spop_load.py --policy policies/synapse-workers.yaml --whoami
                                                   # half the users with opaque tokens,
                                                   # resolved by a demo homeserver's whoami
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.spop import Message, decode_varint  # noqa: E402
from spoa.spop.testing import haproxy_hello, notify  # noqa: E402
from spoa.traffic import Deployment, generate  # noqa: E402

_LENGTH = struct.Struct(">I")
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Route messages as HAProxy builds them, from the spoa.traffic mix.
_MIX = list(generate(4096, Deployment(users=2000, rooms=500, remotes=100)))


def use_mix(opaque_share: float) -> None:
    """The mix again, with this share of users holding opaque (MAS-like) tokens."""
    deployment = Deployment(users=2000, rooms=500, remotes=100, opaque_share=opaque_share)
    _MIX[:] = generate(4096, deployment)


def whoami_policy(policy: str, port: int) -> str:
    """A policy extending ``policy`` with a whoami setting for the demo homeserver."""
    site = Path(tempfile.mkdtemp()) / "site.yaml"
    site.write_text(
        f"version: 1\nextends: {Path(policy).resolve()}\nwhoami:\n"
        f"  url: http://127.0.0.1:{port}/_matrix/client/v3/account/whoami\n"
        "  max_per_second: 10000\n  max_concurrent: 64\n"
    )
    return str(site)


def route_message(i: int) -> Message:
    return _MIX[i % len(_MIX)].route_message()


@dataclass
class Totals:
    acks: int = 0
    sent: int = 0
    latencies: list[int] = field(default_factory=list)
    recording: bool = False


class LoadConnection(asyncio.Protocol):
    """One HAProxy-like connection with ``window`` stream slots."""

    def __init__(self, window: int, totals: Totals, ready: asyncio.Future[None]) -> None:
        self.window = window
        self.totals = totals
        self.ready = ready
        # Slot s uses stream-id s+1; its frame is prebuilt, only the send
        # time changes.
        self.frames = [notify(s + 1, 1, [route_message(s)]) for s in range(window)]
        self.free = list(range(window))
        self.sent_at = [0] * window
        self.buf = b""
        self.hello_done = False
        self.closed_loop = True
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.transport is not None
        self.transport.write(haproxy_hello())

    def send(self, count: int) -> int:
        """Send up to ``count`` frames on free slots; return how many."""
        free = self.free
        n = min(count, len(free))
        if n <= 0 or self.transport is None:
            return 0
        now = time.perf_counter_ns()
        frames = self.frames
        sent_at = self.sent_at
        out = []
        for _ in range(n):
            slot = free.pop()
            sent_at[slot] = now
            out.append(frames[slot])
        self.transport.write(b"".join(out))
        self.totals.sent += n
        return n

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        size = len(buf)
        now = time.perf_counter_ns()
        done = 0
        totals = self.totals
        record = totals.recording
        lat = totals.latencies
        sent_at = self.sent_at
        free = self.free
        while size - pos >= 4:
            (length,) = _LENGTH.unpack_from(buf, pos)
            end = pos + 4 + length
            if end > size:
                break
            frame_type = buf[pos + 4]
            if frame_type == 103:
                sid, _ = decode_varint(buf, pos + 9, end)
                slot = sid - 1
                if record:
                    lat.append(now - sent_at[slot])
                free.append(slot)
                done += 1
            elif frame_type == 101:
                self.hello_done = True
                if not self.ready.done():
                    self.ready.set_result(None)
            elif frame_type == 102:
                print("agent disconnected:", buf[pos:end], file=sys.stderr)
            pos = end
        self.buf = buf[pos:] if pos < size else b""
        if done:
            totals.acks += done
            if self.closed_loop:
                self.send(done)


def agent_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(q * len(sorted_values)))
    return sorted_values[index] / 1000.0


def start_agent(cpu: int | None, loop: str, extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "spoa",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--loop",
        loop,
        "--log-level",
        "WARNING",
        "--http",
        "off",
        *extra,
    ]
    # The agent logs its port at INFO; ask for it explicitly.
    cmd[cmd.index("WARNING")] = "INFO"
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None,  # noqa: PLW1509
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    said = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        said.append(line)
        found = re.search(r"listening for SPOP on \S+:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    proc.kill()
    raise SystemExit("agent did not start:\n" + "".join(said[-10:]))


async def run(args: argparse.Namespace, port: int, pid: int | None) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    totals = Totals()
    conns: list[LoadConnection] = []
    for _ in range(args.connections):
        ready: asyncio.Future[None] = loop.create_future()
        _, proto = await loop.create_connection(
            lambda ready=ready: LoadConnection(args.window, totals, ready),  # type: ignore[misc]
            "127.0.0.1",
            port,
        )
        conns.append(proto)
        await ready
    open_loop = args.rate > 0
    for conn in conns:
        conn.closed_loop = not open_loop

    async def pace() -> None:
        # Busy-paced on this generator's own core: frames go out as they fall
        # due, a few at a time, like requests reaching HAProxy, rather than in
        # bursts per timer tick (which would measure the burst, not the agent).
        t0 = time.perf_counter()
        due_total = 0
        i = 0
        while True:
            target = int((time.perf_counter() - t0) * args.rate)
            while due_total < target:
                conn = conns[i % len(conns)]
                i += 1
                if conn.send(1):
                    due_total += 1
                elif all(not c.free for c in conns):
                    # Every slot busy: the agent is behind; the frame waits.
                    break
            await asyncio.sleep(0)

    pacer = None
    if open_loop:
        pacer = loop.create_task(pace())
    else:
        for conn in conns:
            conn.send(args.window)

    await asyncio.sleep(args.warmup)
    totals.recording = True
    acks0 = totals.acks
    cpu0 = agent_cpu_seconds(pid) if pid else 0.0
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    elapsed = time.perf_counter() - t0
    cpu1 = agent_cpu_seconds(pid) if pid else 0.0
    acks = totals.acks - acks0
    totals.recording = False
    if pacer:
        pacer.cancel()
    for conn in conns:
        if conn.transport:
            conn.transport.close()
    lat = sorted(totals.latencies)
    result = {
        "decisions_per_s": acks / elapsed,
        "p50_us": percentile(lat, 0.50),
        "p99_us": percentile(lat, 0.99),
        "p999_us": percentile(lat, 0.999),
        "agent_cpu_us_per_decision": (cpu1 - cpu0) / acks * 1e6 if pid and acks else float("nan"),
        "agent_cpu_share": (cpu1 - cpu0) / elapsed if pid else float("nan"),
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--window", type=int, default=64, help="frames in flight per connection")
    parser.add_argument("--rate", type=float, default=0, help="open loop: frames per second")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connect", type=int, metavar="PORT", help="use a running agent")
    parser.add_argument("--agent-cpu", type=int, default=0, help="core to pin the agent to")
    parser.add_argument("--load-cpu", type=int, default=1, help="core to pin this generator to")
    parser.add_argument("--agent-loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    parser.add_argument(
        "--policy",
        metavar="FILE",
        help="run the agent with this policy (default: a constant answer, --static-class main)",
    )
    parser.add_argument(
        "--opaque-share",
        type=float,
        default=0.0,
        help="share of users with opaque (MAS-like) tokens instead of syt_ ones",
    )
    parser.add_argument(
        "--whoami",
        action="store_true",
        help="resolve opaque tokens with whoami (a demo homeserver; --opaque-share 0.5 "
        "unless given; the warm-up fills the cache)",
    )
    parser.add_argument("agent_args", nargs="*", help="extra arguments for spoa serve (after --)")
    args = parser.parse_args()

    homeserver = None
    if args.whoami:
        if not args.policy:
            raise SystemExit("--whoami needs --policy")
        args.opaque_share = args.opaque_share or 0.5
        args.warmup = max(args.warmup, 3.0)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            hs_port = probe.getsockname()[1]
        homeserver = subprocess.Popen(
            [sys.executable, "-m", "spoa", "demo-worker", f"hs-1=127.0.0.1:{hs_port}"],
            cwd=ROOT,
            stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, {args.load_cpu})),  # noqa: PLW1509
        )
        args.policy = whoami_policy(args.policy, hs_port)
    if args.opaque_share:
        use_mix(args.opaque_share)

    proc = None
    if args.connect:
        port, pid = args.connect, None
    else:
        what = ["--policy", args.policy] if args.policy else ["--static-class", "main"]
        # This generator keeps --window frames waiting per connection, all live.
        what += ["--peer-window", str(args.window)]
        proc, port = start_agent(args.agent_cpu, args.agent_loop, what + args.agent_args)
        pid = proc.pid
    if args.load_cpu is not None and args.load_cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {args.load_cpu})
    try:
        try:
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:
            runner = asyncio.Runner()
        with runner:
            result = runner.run(run(args, port, pid))
    finally:
        for child in (proc, homeserver):
            if child:
                child.terminate()
                child.wait(10)
    load1, load5, _ = os.getloadavg()
    mode = f"open loop at {args.rate:.0f}/s" if args.rate else f"closed loop, window {args.window}"
    mode += f", handler: {'policy ' + Path(args.policy).name if args.policy else 'constant'}"
    if args.opaque_share:
        mode += f", {args.opaque_share:.0%} opaque tokens"
        mode += " resolved by whoami" if args.whoami else " (token keys)"
    print(
        f"spop_load: {args.connections} connections, {mode}, {args.duration:.0f}s "
        f"(load average before exit {load1:.2f} {load5:.2f})"
    )
    print(f"  decisions/s          {result['decisions_per_s']:12,.0f}")
    print(f"  latency p50          {result['p50_us']:12.1f} us")
    print(f"  latency p99          {result['p99_us']:12.1f} us")
    print(f"  latency p99.9        {result['p999_us']:12.1f} us")
    print(f"  agent CPU/decision   {result['agent_cpu_us_per_decision']:12.2f} us")
    print(f"  agent CPU share      {result['agent_cpu_share']:12.2f} of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
