"""The policy decides through real HAProxy: classes, sticky keys, live policy changes.

``spoa serve --policy`` runs as its own process behind HAProxy 2.6; each worker
class is a backend of HTTP servers that answer with their own name, balanced
with ``balance hash var(txn.route.key)`` and ``hash-type consistent``.
"""

from __future__ import annotations

import http.client
import shutil
import signal
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
    routing_config,
    wait_until,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLASSES = {
    "main": 1,
    "synchrotron": 4,
    "initial_sync": 2,
    "client_reader": 2,
    "event_creator": 4,
    "federation_inbound": 4,
    "federation_reader": 2,
    "media_repository": 1,
}


@dataclass
class Answer:
    served_by: str
    backend: str
    rule: str
    policy: str


@dataclass
class Stack:
    haproxy: HAProxy
    agent: AgentProcess
    port: int
    policy: Path

    def send(
        self,
        path: str,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> Answer:
        conn = http.client.HTTPConnection(source, self.port, timeout=10)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            body = response.read().decode().strip()
            assert response.status == 200, (response.status, body)
            return Answer(
                body,
                response.getheader("X-Route-Backend", ""),
                response.getheader("X-Route-Rule", ""),
                response.getheader("X-Route-Policy", ""),
            )
        finally:
            conn.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    labels = [f"{name}/s{i}" for name, count in CLASSES.items() for i in range(1, count + 1)]
    policy = tmp_path / "policy.yaml"
    shutil.copy(ROOT / "policies" / "synapse-workers.yaml", policy)
    with http_backends(labels) as backends:
        agent = AgentProcess(
            [
                "-m",
                "spoa",
                "serve",
                "--policy",
                str(policy),
                "--listen",
                "127.0.0.1:0",
                "--poll-interval",
                "0.2",
                "--http",
                "127.0.0.1:0",
            ],
            tmp_path / "agent.log",
        ).start()
        port = free_port()
        sections = []
        for name, count in CLASSES.items():
            servers = "\n".join(
                f"    server s{i} 127.0.0.1:{backends[f'{name}/s{i}'].port}"
                for i in range(1, count + 1)
            )
            sections.append(
                f"backend be_{name}\n    balance hash var(txn.route.key)\n"
                f"    hash-type consistent\n{servers}\n"
            )
        haproxy = HAProxy(
            tmp_path,
            routing_config(
                tmp_path,
                port,
                agent.port,
                "\n".join(sections),
                addresses=("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"),
            ),
            TEST_SPOE.format(processing="500ms"),
        )
        try:
            haproxy.start(port)
            wait_until(lambda: haproxy.server_status("be_spoa", "agent") == "UP", 10, "agent UP")
            yield Stack(haproxy, agent, port, policy)
        finally:
            haproxy.stop()
            agent.stop()


def syt(localpart: str, device: str) -> str:
    import base64

    encoded = base64.b64encode(localpart.encode()).decode().rstrip("=")
    return f"syt_{encoded}_{device}aaaaaaaaaaaaaaaa_1a2b3c"


def test_each_class_is_reached_through_haproxy(stack: Stack) -> None:
    cases = [
        ("GET", "/_matrix/client/v3/sync?since=s1", "synchrotron"),
        ("GET", "/_matrix/client/v3/sync", "initial_sync"),
        ("GET", "/_matrix/client/v3/rooms/!r:x/messages?dir=b", "client_reader"),
        ("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t", "event_creator"),
        ("PUT", "/_matrix/federation/v1/send/123", "federation_inbound"),
        ("GET", "/_matrix/federation/v1/state_ids/!r:x?event_id=$e", "federation_reader"),
        ("GET", "/_matrix/media/v3/download/x/y", "media_repository"),
        ("POST", "/_matrix/client/v3/logout", "main"),
    ]
    for method, path, expected in cases:
        answer = stack.send(path, method)
        assert answer.backend == expected, (path, answer)
        assert answer.served_by.startswith(expected + "/"), (path, answer)


def test_one_users_sync_sticks_to_one_server_whether_the_token_is_in_header_or_query(
    stack: Stack,
) -> None:
    servers_used = set()
    for n in range(12):
        user = f"user{n}"
        seen = set()
        for device in ("dev1", "dev2"):
            token = syt(user, device)
            seen.add(
                stack.send(
                    "/_matrix/client/v3/sync?since=s1", headers={"Authorization": f"Bearer {token}"}
                ).served_by
            )
            seen.add(stack.send(f"/_matrix/client/v3/sync?since=s1&access_token={token}").served_by)
        assert len(seen) == 1, (user, seen)
        servers_used |= seen
    assert len(servers_used) > 1, "all users on one server: stickiness proves nothing"


def test_raw_and_percent_encoded_room_ids_reach_the_same_event_creator(stack: Stack) -> None:
    servers_used = set()
    for n in range(12):
        raw = stack.send(
            f"/_matrix/client/v3/rooms/!room{n}:example.org/send/m.room.message/t1", "PUT"
        )
        encoded = stack.send(
            f"/_matrix/client/v3/rooms/%21room{n}%3Aexample.org/send/m.room.message/t2", "PUT"
        )
        lower = stack.send(
            f"/_matrix/client/v3/rooms/%21room{n}%3aexample.org/send/m.room.message/t3", "PUT"
        )
        assert raw.backend == "event_creator"
        assert raw.served_by == encoded.served_by == lower.served_by
        servers_used.add(raw.served_by)
    assert len(servers_used) > 1


def test_one_origins_transactions_stick_whatever_the_source_address(stack: Stack) -> None:
    servers_used = set()
    for n in range(12):
        auth = f'X-Matrix origin="server{n}.example",key="ed25519:a",sig="c2ln"'
        seen = {
            stack.send(
                f"/_matrix/federation/v1/send/{n}{i}",
                "PUT",
                headers={"Authorization": auth},
                source=source,
            ).served_by
            for i, source in enumerate(("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"))
        }
        assert len(seen) == 1, (n, seen)
        servers_used |= seen
    assert len(servers_used) > 1


def test_editing_the_policy_moves_requests_with_no_reload_of_anything(stack: Stack) -> None:
    pid = stack.haproxy.proc.pid if stack.haproxy.proc else 0
    before = stack.send("/_matrix/client/v3/rooms/!r:x/messages")
    assert before.backend == "client_reader"

    text = stack.policy.read_text()
    moved = text.replace(
        "  - name: room_messages\n    class: client_reader",
        "  - name: room_messages\n    class: event_creator",
    )
    assert moved != text
    stack.policy.write_text(moved)

    deadline = time.monotonic() + 10
    while (after := stack.send("/_matrix/client/v3/rooms/!r:x/messages")).backend != (
        "event_creator"
    ):
        assert time.monotonic() < deadline, "the policy change was not applied"
        time.sleep(0.1)
    assert after.served_by.startswith("event_creator/")
    assert after.policy != before.policy
    assert stack.haproxy.proc is not None and stack.haproxy.proc.pid == pid
    assert stack.haproxy.proc.poll() is None
    assert "policy reloaded" in stack.agent.log()


def test_a_broken_edit_changes_nothing_and_sighup_applies_a_fix(stack: Stack) -> None:
    good = stack.policy.read_text()
    before = stack.send("/_matrix/client/v3/sync?since=s1")
    stack.policy.write_text(good.replace("class: synchrotron", "class: nowhere"))
    wait_until(lambda: "policy rejected" in stack.agent.log(), 10, "the rejection in the log")
    assert "unknown class 'nowhere'" in stack.agent.log()
    after = stack.send("/_matrix/client/v3/sync?since=s1")
    assert (after.backend, after.policy) == ("synchrotron", before.policy)

    fixed = good.replace("name: sync\n    class: synchrotron", "name: sync\n    class: main")
    stack.policy.write_text(fixed)
    assert stack.agent.proc is not None
    stack.agent.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: stack.send("/_matrix/client/v3/sync?since=s1").backend == "main",
        10,
        "the fixed policy to apply",
    )
