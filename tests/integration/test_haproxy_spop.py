"""The agent behind a real HAProxy: SPOE filter, route message, dynamic use_backend.

The agent here is ``tests.agents.path_agent`` (``/to/<name>`` -> backend
``<name>``, anything else -> ``generic``) on the real server, so these tests
prove the protocol and the server against HAProxy, independent of any policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spoa.demo.ports import free_port
from tests.integration.harness import (
    TEST_SPOE,
    AgentProcess,
    HAProxy,
    http_backends,
    http_request,
    routing_config,
    wait_until,
)

pytestmark = pytest.mark.integration

CLASSES = ("main", "sync", "media", "generic")


@dataclass
class Stack:
    haproxy: HAProxy
    agent: AgentProcess
    port: int

    def get(self, path: str, **kwargs: object) -> tuple[int, str, str, float]:
        response = http_request(self.port, path, **kwargs)  # type: ignore[arg-type]
        return (
            response.status,
            response.body.strip(),
            response.headers.get("x-route-backend", ""),
            response.seconds,
        )

    def agent_status(self) -> str:
        return self.haproxy.server_status("be_spoa", "agent")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with http_backends(CLASSES) as backends:
        agent = AgentProcess(
            ["-m", "tests.agents.path_agent", "--listen", "127.0.0.1:0"], tmp_path / "agent.log"
        ).start()
        port = free_port()
        backend_text = "\n".join(
            f"backend be_{name}\n    server s1 127.0.0.1:{backend.port}\n"
            for name, backend in backends.items()
        )
        haproxy = HAProxy(
            tmp_path,
            routing_config(tmp_path, port, agent.port, backend_text),
            TEST_SPOE.format(processing="1s"),
        )
        try:
            haproxy.start(port)
            stack = Stack(haproxy, agent, port)
            wait_until(lambda: stack.agent_status() == "UP", 10, "agent health check UP")
            yield stack
        finally:
            haproxy.stop()
            agent.stop()


def test_requests_land_on_the_backend_the_agent_chose(stack: Stack) -> None:
    for name in ("sync", "media", "main", "sync"):
        status, body, decided, _ = stack.get(f"/to/{name}/x?since=1")
        assert (status, body, decided) == (200, name, name)
    status, body, decided, _ = stack.get("/_matrix/client/versions")
    assert (status, body, decided) == (200, "generic", "generic")


def test_unknown_backend_name_falls_back_to_the_default_backend(stack: Stack) -> None:
    status, body, decided, _ = stack.get("/to/nonexistent/x")
    assert (status, body, decided) == (200, "main", "nonexistent")


def test_all_request_kinds_and_strange_headers_are_answered(stack: Stack) -> None:
    headers = {
        "Authorization": 'X-Matrix origin="remote.example",key="ed25519:a",sig="b,c"',
        "X-Odd": "\u00e9\u00ff",
    }
    for method in ("GET", "PUT", "POST", "DELETE"):
        status, body, decided, _ = stack.get(
            "/to/sync/%21room%3Aexample.org?access_token=syt_x", method=method, headers=headers
        )
        assert (status, body, decided) == (200, "sync", "sync")


def test_many_concurrent_requests_are_all_routed_by_the_agent(stack: Stack) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = ["sync", "media", "main", "generic"] * 50
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: stack.get(f"/to/{n}/"), names))
    assert [(r[0], r[1]) for r in results] == [(200, n) for n in names]
    assert all(r[2] == n for r, n in zip(results, names, strict=True))


def test_agent_down_fails_open_then_fast_then_routing_resumes(stack: Stack) -> None:
    assert stack.get("/to/sync/")[1:3] == ("sync", "sync")

    assert stack.agent.stop() == 0
    # While the agent is gone every request still gets a 200, from the
    # default backend, with no route decided.
    for _ in range(5):
        status, body, decided, _ = stack.get("/to/sync/")
        assert (status, body, decided) == (200, "main", "")
    wait_until(lambda: stack.agent_status().startswith("DOWN"), 10, "agent marked DOWN")

    # Once DOWN, nothing waits for the 1 s processing timeout.
    slowest = max(stack.get("/to/sync/")[3] for _ in range(20))
    assert slowest < 0.3, f"a request took {slowest:.3f}s with the agent marked down"

    stack.agent.args[-1] = f"127.0.0.1:{stack.agent.port}"
    stack.agent.start()
    wait_until(lambda: stack.agent_status() == "UP", 10, "agent marked UP again")
    deadline = time.monotonic() + 5
    while stack.get("/to/sync/")[2] != "sync":
        assert time.monotonic() < deadline, "routing by the agent did not resume"
        time.sleep(0.1)
    status, body, decided, _ = stack.get("/to/media/")
    assert (status, body, decided) == (200, "media", "media")
