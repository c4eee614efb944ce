"""spoa demo (./dev.sh run) as a person runs it: a summary, then up until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spoa.demo.ports import free_port
from tests.integration.harness import port_open

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_demo_shows_where_traffic_went_stays_up_and_ctrl_c_stops_everything(
    tmp_path: Path,
) -> None:
    port, stats, agent, agent_http = free_port(), free_port(), free_port(), free_port()
    output = tmp_path / "out.txt"
    with output.open("w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "spoa",
                "demo",
                "--port",
                str(port),
                "--stats-port",
                str(stats),
                "--agent-port",
                str(agent),
                "--agent-http",
                f"127.0.0.1:{agent_http}",
                "--burst",
                "150",
                "--workdir",
                str(tmp_path / "run"),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops everything" not in output.read_text():
            assert proc.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.2)
        text = output.read_text()
        assert "150 requests, 150 answered 200" in text
        for kind in ("sync", "send", "federation_send", "media"):
            assert f"\n  {kind} " in text
        assert "synchrotron" in text and "event_creator" in text
        assert all(port_open(p) for p in (port, stats, agent, agent_http))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.5)
    assert not any(port_open(p) for p in (port, stats, agent, agent_http)), "left running"
