"""Faults under load, through the shipped configuration: the agent stalled, the agent dead.

A bounded paced load (1000 requests a second of the Matrix mix, for a few
seconds) goes through HAProxy while the agent is stopped with SIGSTOP, or
killed. Run on every HAProxy the project supports (SPOA_HAPROXY picks the
binary; CI runs this module on 2.6 and on the 3.x builds).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest

from spoa.demo.load import Load, Sample, over
from spoa.demo.stack import haproxy_version
from spoa.traffic import Deployment, TrafficRequest, generate
from tests.integration.stack_runner import log_fields, running_stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "synapse-workers.yaml"
RATE = 1000
SLOW_MS = 90


def requests() -> list[TrafficRequest]:
    return list(generate(4000, Deployment(users=200, rooms=50, remotes=20, seed=3)))


def test_after_a_stall_of_the_agent_no_request_waits_for_it_within_3_seconds(
    tmp_path: Path,
) -> None:
    """SIGSTOP the agent 3 s under load, SIGCONT: every agent connection recovers.

    On HAProxy 3.1+ the agent's answers to the backlog of NOTIFYs read after
    the stall, poured at once, could fill the demux buffer of an agent
    connection in one read, which blocks that connection for good: its
    requests all waited timeout processing, while the health check said UP.
    """
    with running_stack(tmp_path, POLICY) as runner:
        agent = runner.stack.agent
        assert agent is not None
        load = Load(runner.stack.port, requests(), rate=RATE)

        async def drive() -> tuple[float, float, list[Sample]]:
            task = asyncio.create_task(load.run(14))
            await asyncio.sleep(4)
            stopped = time.monotonic()
            os.kill(agent.pid, signal.SIGSTOP)
            await asyncio.sleep(3)
            os.kill(agent.pid, signal.SIGCONT)
            resumed = time.monotonic()
            return stopped, resumed, await task

        stopped, resumed, samples = asyncio.run(drive())
        end = max(s.sent for s in samples) + 1
        after = sum(1 for s in samples if s.sent >= resumed + 3)
        slow_after = over(samples, SLOW_MS, resumed + 3, end)
        before = over(samples, SLOW_MS, 0, stopped)
        during = over(samples, SLOW_MS, stopped, resumed)
        first = over(samples, SLOW_MS, resumed, resumed + 3)
        print(
            f"\nHAProxy {haproxy_version()}: 3 s stall; slow before {before}, during {during}, "
            f"first 3 s after {first}, then {slow_after} of {after}"
        )
        assert after > 3000
        # The failure this guards against left three requests in four waiting
        # timeout processing after the stall, for good. A loaded machine
        # delays a few requests whatever the agent does: no more after the
        # stall than before it (the same load, over 4 s) is no blocked
        # connection.
        assert slow_after <= 2 * before + 2, (slow_after, before)
        assert all(200 <= s.status < 300 for s in samples)
        assert "Traceback" not in (runner.stack.workdir / "agent.log").read_text()


def accepted_at(line: str) -> float:
    """When HAProxy accepted the request of a log line (%tr, local time), as a timestamp."""
    stamp = line.split("[", 1)[1].split("]", 1)[0]
    return datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S.%f").timestamp()


def test_with_the_agent_dead_and_marked_down_no_request_waits_for_it(tmp_path: Path) -> None:
    """kill -9 the agent under load: once HAProxy marks it DOWN, nothing waits (2.6 too).

    A request HAProxy asked the dead agent about ends with txn.route.err set
    (a timeout on 2.6, an I/O error at once on 3.x): HAProxy's own log tells
    which requests were sent to the agent, whatever the machine's load did to
    their latency.
    """
    with running_stack(tmp_path, POLICY) as runner:
        load = Load(runner.stack.port, requests(), rate=RATE)

        async def drive() -> tuple[float, float, float, list[Sample]]:
            task = asyncio.create_task(load.run(10))
            await asyncio.sleep(3)
            killed = time.monotonic()
            await asyncio.to_thread(runner.kill_agent)
            await asyncio.to_thread(runner.wait_agent, "DOWN")
            return killed, time.monotonic(), time.time(), await task

        killed, down, down_wall, samples = asyncio.run(drive())
        end = max(s.sent for s in samples) + 1
        # A request sent just before DOWN may still wait: start 0.2 s after.
        after = sum(1 for s in samples if s.sent >= down + 0.2)
        slow = over(samples, SLOW_MS, down + 0.2, end)
        before = over(samples, SLOW_MS, 0, killed)
        logged = [
            log_fields(line)
            for line in runner.log_lines()
            if " via=" in line and accepted_at(line) >= down_wall + 0.2
        ]
        asked = [f for f in logged if f["spoe_err"] != "-"]
        print(
            f"\nHAProxy {haproxy_version()}: agent dead; {len(asked)} of {len(logged)} logged "
            f"after DOWN were sent to it; {slow} of {after} took over {SLOW_MS} ms "
            f"({before} before the kill)"
        )
        assert after > 4000
        assert len(logged) >= after * 0.9
        assert asked == []
        # HAProxy's log says none waited for the agent; a loaded machine
        # delays a few requests whatever the agent does: no more after DOWN
        # than before the kill (3 s of the same load).
        assert slow <= 2 * before + 2, (slow, before)
        assert all(f["via"] == "fallback" for f in logged)
        assert all(200 <= s.status < 300 for s in samples)
