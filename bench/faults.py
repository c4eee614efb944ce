"""Fault campaign against the shipped stack: prints what each fault cost.

The shipped haproxy/haproxy.cfg, the agent and demo workers for every class
(spoa demo's stack, on loopback), a paced load of Matrix requests, and one
fault at a time:

  kill     kill -9 the agent, restart it 20 s later
  stall1   SIGSTOP the agent for 1 s, then SIGCONT
  stall10  the same for 10 s
  reloads  100 policy reloads under load, a quarter written in place in three
           chunks 0.3 s apart, the rest by atomic rename; misroutes counted
  broken   20 broken policy edits under load: each rejected, routing unchanged
  fuzz     malformed SPOP straight to the agent, a canary connection checked
           after each batch
  soak     ever-new users, rooms and tokens for --soak seconds, the agent's
           resident memory sampled
  spill    rooms whose sends reached more than one event creator in 20 s, with
           be_event_creator's hash-balance-factor at 150, 300 and none

    python bench/faults.py [--haproxy PATH] [--rate 1000] [--only kill,stall1,...]
                           [--fuzz 1000000] [--soak 600]

Everything is bounded in time and stays on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoa.demo.load import Load, Sample, over  # noqa: E402
from spoa.demo.ports import free_port  # noqa: E402
from spoa.demo.stack import DemoStack  # noqa: E402
from spoa.spop import Message  # noqa: E402
from spoa.spop.testing import haproxy_hello, notify  # noqa: E402
from spoa.traffic import Deployment, TrafficRequest, generate, mas_token, syt_token  # noqa: E402

SLOW_MS = 90
SUCCESS = 'spoa_policy_reloads_total{result="success"}'
FAILURE = 'spoa_policy_reloads_total{result="failure"}'
POLICY = ROOT / "policies" / "synapse-workers.yaml"


class Campaign:
    """The stack on its own event-loop thread; faults and load from the main thread."""

    def __init__(self, workdir: Path, rate: float, haproxy_dir: Path = ROOT / "haproxy") -> None:
        self.rate = rate
        self.policy = workdir / "policy.yaml"
        shutil.copy(POLICY, self.policy)
        self.stack = DemoStack(
            workdir=workdir,
            policy=self.policy,
            port=free_port(),
            stats_port=free_port(),
            agent_port=free_port(),
            agent_http=f"127.0.0.1:{free_port()}",
            check_inter="1s",
            poll_interval=0.2,
            haproxy_dir=haproxy_dir,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.stack.start())
        self.call(self.stack.wait_ready(60))
        self.requests = list(generate(5000, Deployment(users=200, rooms=50, remotes=20)))

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        try:
            self.call(self.stack.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def agent_pid(self) -> int:
        assert self.stack.agent is not None
        return self.stack.agent.pid

    def agent_state(self) -> str:
        return self.stack.server_states().get(("be_spoa", "agent1"), "")

    def wait_agent(self, state: str, timeout: float = 20) -> float:
        deadline = time.monotonic() + timeout
        while not self.agent_state().startswith(state):
            if time.monotonic() > deadline:
                raise SystemExit(f"the agent never became {state}")
            time.sleep(0.05)
        return time.monotonic()

    def load(
        self, seconds: float, during: Callable[[], Coroutine[Any, Any, dict[str, float]]]
    ) -> tuple[list[Sample], dict[str, float]]:
        load = Load(self.stack.port, self.requests, rate=self.rate)

        async def run() -> tuple[list[Sample], dict[str, float]]:
            task = asyncio.create_task(load.run(seconds))
            marks = await during()
            return await task, marks

        return asyncio.run(run())

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://{self.stack.agent_http}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0


def non_2xx(samples: list[Sample]) -> int:
    return sum(1 for s in samples if not 200 <= s.status < 300)


# -- the faults ---------------------------------------------------------------------------


def kill(c: Campaign) -> str:
    async def during() -> dict[str, float]:
        await asyncio.sleep(5)
        killed = time.monotonic()
        os.kill(c.agent_pid, signal.SIGKILL)
        down = await asyncio.to_thread(c.wait_agent, "DOWN")
        await asyncio.sleep(max(0.0, killed + 20 - time.monotonic()))
        c.stack.start_agent()
        up = await asyncio.to_thread(c.wait_agent, "UP")
        return {"killed": killed, "down": down, "up": up}

    samples, m = c.load(35, during)
    return (
        f"DOWN after {m['down'] - m['killed']:.1f} s; waited >{SLOW_MS} ms: "
        f"{over(samples, SLOW_MS, m['killed'], m['down'])} before DOWN, "
        f"{over(samples, SLOW_MS, m['down'] + 0.2, m['up'])} while DOWN, "
        f"{over(samples, SLOW_MS, m['up'] + 3, 1e12)} from 3 s after UP; "
        f"non-2xx {non_2xx(samples)} of {len(samples)}"
    )


def stall(seconds: float) -> Callable[[Campaign], str]:
    def run(c: Campaign) -> str:
        async def during() -> dict[str, float]:
            await asyncio.sleep(5)
            stopped = time.monotonic()
            os.kill(c.agent_pid, signal.SIGSTOP)
            await asyncio.sleep(seconds)
            os.kill(c.agent_pid, signal.SIGCONT)
            return {"stopped": stopped, "resumed": time.monotonic()}

        samples, m = c.load(5 + seconds + 20, during)
        resumed = m["resumed"]
        after = sum(1 for s in samples if s.sent >= resumed + 3)
        return (
            f"waited >{SLOW_MS} ms: {over(samples, SLOW_MS, m['stopped'], resumed)} during, "
            f"{over(samples, SLOW_MS, resumed, resumed + 3)} in the 3 s after SIGCONT, "
            f"{over(samples, SLOW_MS, resumed + 3, 1e12)} of {after} after that; "
            f"non-2xx {non_2xx(samples)} of {len(samples)}; "
            f"stale NOTIFYs left unanswered {c.metric('spoa_stale_notifies_total'):.0f}"
        )

    return run


#: Two policy versions that move /messages between two classes.
def versions(c: Campaign) -> tuple[str, str]:
    text = POLICY.read_text()
    moved = text.replace(
        "  - name: room_messages\n    class: client_reader",
        "  - name: room_messages\n    class: event_creator",
    )
    assert moved != text
    return text, moved


def misroutes(samples: list[Sample]) -> int:
    """Requests answered by a class neither policy version sends them to."""
    allowed = {"messages": {"client_reader", "event_creator"}}
    expected = {
        "sync": "synchrotron",
        "sliding_sync": "synchrotron",
        "initial_sync": "initial_sync",
        "send": "event_creator",
        "federation_send": "federation_inbound",
        "federation_read": "federation_reader",
        "media": "media_repository",
        "receipt": "receipts",
        "typing": "typing",
        "keys": "client_reader",
        "profile": "event_creator",
        "versions": "client_reader",
    }
    wrong = 0
    for s in samples:
        worker_class = s.worker.rsplit("-", 1)[0]
        kind = s.request.kind
        ok = allowed.get(kind) or ({expected[kind]} if kind in expected else None)
        if ok is not None and worker_class not in ok:
            wrong += 1
    return wrong


def write_in_chunks(path: Path, text: str) -> None:
    third = len(text) // 3
    with path.open("r+") as handle:
        handle.truncate(0)
        for chunk in (text[:third], text[third : 2 * third], text[2 * third :]):
            handle.write(chunk)
            handle.flush()
            time.sleep(0.3)


def write_by_rename(path: Path, text: str) -> None:
    staged = path.with_name(".staged.yaml")
    staged.write_text(text)
    os.replace(staged, path)


def reloads(c: Campaign, count: int = 100) -> str:
    a, b = versions(c)
    before = c.metric(SUCCESS)

    async def during() -> dict[str, float]:
        for n in range(count):
            text = b if n % 2 == 0 else a
            if n % 4 == 0:
                await asyncio.to_thread(write_in_chunks, c.policy, text)
                await asyncio.sleep(1.5)  # the settle time, then a poll
            else:
                await asyncio.to_thread(write_by_rename, c.policy, text)
                await asyncio.sleep(0.4)
        return {}

    samples, _ = c.load(count // 4 * 2.4 + count * 3 // 4 * 0.45 + 5, during)
    reloaded = c.metric(SUCCESS) - before
    return (
        f"{count} edits ({count // 4} in place in 3 chunks, the rest renamed): "
        f"misroutes {misroutes(samples)} of {len(samples)}, non-2xx {non_2xx(samples)}, "
        f"reloads {reloaded:.0f}, rejected {c.metric(FAILURE):.0f}"
    )


def broken(c: Campaign, count: int = 20) -> str:
    a, _ = versions(c)
    write_by_rename(c.policy, a)
    time.sleep(1)
    edits = [
        a.replace("class: synchrotron", "class: synchrotorn", 1),
        a.replace("'^/_matrix/client/(r0|v3)/sync$'", "'^/_matrix/client/(r0|v3/sync$'", 1),
        a + "\n  - {name: sync, class: main, path: x}\n",
        a.replace("version: 1", "version: 2"),
        a[: len(a) // 2] + "\n  - [",
    ]
    failures_before = c.metric(FAILURE)

    async def during() -> dict[str, float]:
        for n in range(count):
            text = edits[n % len(edits)] + f"\n# edit {n}\n"
            writer = write_by_rename if n % 2 else write_in_chunks
            await asyncio.to_thread(writer, c.policy, text)
            await asyncio.sleep(1.5)
        await asyncio.to_thread(write_by_rename, c.policy, a)
        return {}

    samples, _ = c.load(count * 2.2 + 3, during)
    rejected = c.metric(FAILURE) - failures_before
    return (
        f"{count} broken edits: rejected {rejected:.0f}, misroutes {misroutes(samples)} of "
        f"{len(samples)}, non-2xx {non_2xx(samples)}"
    )


def mutations(rng: random.Random, valid: list[bytes]) -> bytes:
    """One malformed input: a valid frame broken one of several ways."""
    frame = bytearray(rng.choice(valid))
    how = rng.randrange(6)
    if how == 0:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif how == 1:  # cut short, then garbage
        frame = frame[: rng.randrange(len(frame))] + rng.randbytes(rng.randrange(64))
    elif how == 2:  # a length that lies
        frame[:4] = struct.pack(">I", rng.choice([0, 1, 6, 2**31, 2**32 - 1, len(frame) * 3]))
    elif how == 3:  # an unknown or agent-side frame type
        frame[4] = rng.choice([0, 4, 50, 101, 102, 103, 255])
    elif how == 4:  # random bytes
        frame = bytearray(rng.randbytes(rng.randrange(1, 512)))
    else:  # a huge varint
        frame[9:9] = b"\xff" * rng.randrange(1, 12)
    return bytes(frame)


def fuzz(c: Campaign, inputs: int) -> str:
    import socket

    port = c.stack.agent_port
    rng = random.Random(7)
    route = Message(
        "route", {"method": "GET", "path": "/_matrix/client/v3/sync", "query": "since=1"}
    )
    valid = [haproxy_hello(), notify(1, 1, [route]), notify(7, 2, [route, route])]
    canary = socket.create_connection(("127.0.0.1", port), timeout=2)
    canary.sendall(haproxy_hello())
    canary.recv(4096)
    sent = connections = canary_ok = canary_checks = 0
    pid = c.agent_pid
    started = time.monotonic()
    while sent < inputs:
        connections += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if rng.random() < 0.7:
                    sock.sendall(haproxy_hello())
                for _ in range(rng.randint(1, 4)):
                    sock.sendall(mutations(rng, valid))
                    sent += 1
        except OSError:
            pass
        if connections % 500 == 0:
            canary_checks += 1
            try:
                canary.sendall(notify(canary_checks * 2 + 1, 1, [route]))
                answer = canary.recv(4096)
                canary_ok += int(len(answer) > 9 and answer[4] == 103)
            except OSError:
                pass
    alive = os.waitpid(pid, os.WNOHANG) == (0, 0) if pid else False
    elapsed = time.monotonic() - started
    return (
        f"{sent:,} malformed inputs over {connections:,} connections in {elapsed:.0f} s: "
        f"agent alive {alive}, canary answered {canary_ok} of {canary_checks}"
    )


def rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def soak(c: Campaign, seconds: float) -> str:
    rng = random.Random(11)
    samples_rss: list[int] = []

    def fresh(n: int) -> TrafficRequest:
        token = mas_token(f"soak{n}", rng) if n % 3 else syt_token(f"soak{n}", rng)
        room = f"%21soak{n}%3Aexample.org"
        if n % 2:
            return TrafficRequest(
                "sync",
                "GET",
                "/_matrix/client/v3/sync",
                "since=s1",
                {"Authorization": f"Bearer {token}"},
            )
        return TrafficRequest(
            "send",
            "PUT",
            f"/_matrix/client/v3/rooms/{room}/send/m.room.message/t{n}",
            None,
            {"Authorization": f"Bearer {token}"},
        )

    c.requests = [fresh(n) for n in range(int(seconds * c.rate) + 1)]

    async def during() -> dict[str, float]:
        pid = c.agent_pid
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples_rss.append(rss_of(pid))
            await asyncio.sleep(10)
        samples_rss.append(rss_of(pid))
        return {}

    samples, _ = c.load(seconds, during)
    mib = [r / 2**20 for r in samples_rss]
    # One sample a minute (they are taken every 10 s), to show the trend.
    trend = " ".join(f"{m:.1f}" for m in mib[::6])
    return (
        f"{len(samples):,} requests with ever-new keys over {seconds:.0f} s: agent RSS "
        f"{mib[0]:.1f} MiB at start, {max(mib):.1f} MiB at most, {mib[-1]:.1f} MiB at the end "
        f"(each minute: {trend}); non-2xx {non_2xx(samples)}"
    )


def spill(rate: float) -> str:
    """Rooms spread over event creators, by bounded-load factor (each its own stack)."""
    results = []
    for factor in ("150", "300", "none"):
        directory = Path(tempfile.mkdtemp(prefix="spoa-spill-"))
        shutil.copytree(ROOT / "haproxy", directory / "haproxy")
        config = directory / "haproxy" / "haproxy.cfg"
        text = config.read_text()
        head, sep, tail = text.partition("backend be_event_creator\n")
        body, rest = tail.split("\n\n", 1)
        body = "\n".join(x for x in body.splitlines() if "hash-balance-factor" not in x)
        if factor != "none":
            body = f"    hash-balance-factor {factor}\n" + body
        config.write_text(head + sep + body + "\n\n" + rest)
        c = Campaign(directory, rate, directory / "haproxy")
        try:

            async def idle() -> dict[str, float]:
                return {}

            samples, _ = c.load(20, idle)
        finally:
            c.close()
        rooms: dict[str, set[str]] = {}
        for s in samples:
            if s.request.kind == "send" and s.worker:
                room = s.request.path.split("/rooms/")[1].split("/")[0].replace("%21", "!")
                rooms.setdefault(room.replace("%3A", ":"), set()).add(s.worker)
        spilled = sum(1 for workers in rooms.values() if len(workers) > 1)
        results.append(f"factor {factor}: {spilled} of {len(rooms)} rooms on 2+ workers")
    return "; ".join(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--haproxy", help="the HAProxy binary (default: the system's)")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--only", default="kill,stall1,stall10,reloads,broken,fuzz,soak,spill")
    parser.add_argument("--fuzz", type=int, default=1_000_000, help="malformed inputs")
    parser.add_argument("--soak", type=float, default=600.0, help="seconds of soak")
    args = parser.parse_args()
    if args.haproxy:
        os.environ["SPOA_HAPROXY"] = args.haproxy
    from spoa.demo.stack import haproxy_binary

    version = subprocess.run(
        [haproxy_binary(), "-v"], capture_output=True, text=True, check=True
    ).stdout.split()[2]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"faults: HAProxy {version}, {args.rate:.0f} requests/s, load average {load}")
    faults: dict[str, Callable[[Campaign], str]] = {
        "kill": kill,
        "stall1": stall(1),
        "stall10": stall(10),
        "reloads": reloads,
        "broken": broken,
        "fuzz": lambda c: fuzz(c, args.fuzz),
        "soak": lambda c: soak(c, args.soak),
    }
    for name in args.only.split(","):
        if name == "spill":
            print(f"  spill    {spill(args.rate)}", flush=True)
            continue
        workdir = Path(tempfile.mkdtemp(prefix=f"spoa-faults-{name}-"))
        campaign = Campaign(workdir, args.rate)
        try:
            print(f"  {name:8} {faults[name](campaign)}", flush=True)
        finally:
            campaign.close()
        log = (workdir / "agent.log").read_text(errors="replace")
        if re.search(r"Traceback|CRITICAL", log):
            print(f"  {name:8} the agent's log has a traceback: {workdir}/agent.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
