"""The shipped haproxy/haproxy.cfg itself, with the agent, demo workers and DNS.

Nothing here is a test-only copy of the configuration: HAProxy runs the file
in haproxy/ with its environment variables pointing at loopback, finds the
demo workers through DNS SRV records, asks the agent, and routes by the
fallback map when the agent is gone.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from spoa.demo.client import Outcome
from spoa.demo.stack import DemoStack
from spoa.demo.workers import DemoWorker, WorkerSpec
from spoa.policy import Request, load_policy
from spoa.traffic import Deployment, TrafficRequest, generate
from tests.integration.harness import wait_until
from tests.integration.stack_runner import StackRunner, log_fields, running_stack
from tests.policy_edits import ADDED, MOVED, edited_synapse_policy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE = ROOT / "policies" / "synapse-workers.yaml"
SIMPLE = ROOT / "policies" / "simple.yaml"
MAS = ROOT / "policies" / "synapse-workers-mas.yaml"
TOKEN = "syt_YWxpY2U_abcdefghijklmnopqrst_1a2b3c"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
XMATRIX = {"Authorization": 'X-Matrix origin="remote.example",key="ed25519:a",sig="c2ln"'}


def req(method: str, target: str, headers: dict[str, str] | None = None) -> TrafficRequest:
    path, _, query = target.partition("?")
    return TrafficRequest("sample", method, path, query or None, headers or dict(BEARER))


# One request the synapse-workers policy sends to each of its classes.
SYNAPSE_SAMPLES = {
    "main": req("POST", "/_matrix/client/v3/logout"),
    "synchrotron": req("GET", "/_matrix/client/v3/sync?since=s1_2"),
    "initial_sync": req("GET", "/_matrix/client/v3/sync?timeout=0"),
    "client_reader": req("POST", "/_matrix/client/v3/keys/query"),
    "event_creator": req("PUT", "/_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/t1"),
    "federation_reader": req("GET", "/_matrix/federation/v1/state_ids/!r:x?event_id=%24e", XMATRIX),
    "federation_inbound": req("PUT", "/_matrix/federation/v1/send/17", XMATRIX),
    "media_repository": req("GET", "/_matrix/client/v1/media/download/example.org/abc"),
    "user_dir": req("POST", "/_matrix/client/v3/user_directory/search"),
    "typing": req("PUT", "/_matrix/client/v3/rooms/!r:x/typing/@alice:x"),
    "to_device": req("PUT", "/_matrix/client/v3/sendToDevice/m.room_key_request/t2"),
    "account_data": req("PUT", "/_matrix/client/v3/user/@alice:x/account_data/m.direct"),
    "receipts": req("POST", "/_matrix/client/v3/rooms/!r:x/receipt/m.read/%24e"),
    "presence": req("PUT", "/_matrix/client/v3/presence/@alice:x/status"),
    "push_rules": req("GET", "/_matrix/client/v3/pushrules/"),
    "device_lists": req("GET", "/_matrix/client/v3/devices"),
    "thread_subscriptions": req(
        "PUT", "/_matrix/client/unstable/io.element.msc4306/rooms/!r:x/thread/%24e/subscription"
    ),
    "quarantined_media_changes": req("POST", "/_synapse/admin/v1/media/quarantine/example.org/abc"),
}
#: Native sliding sync (Element X) takes the sync workers, as v2 sync does.
SLIDING_SYNC = req(
    "POST", "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?pos=1&timeout=30000"
)
SIMPLE_SAMPLES = {
    "sync": req("GET", "/_matrix/client/v3/sync?since=s1_2"),
    "generic": req("PUT", "/_matrix/client/v3/rooms/!r:x/send/m.room.message/t1"),
    "main": req("GET", "/_synapse/client/pick_idp"),
}


@pytest.fixture(scope="module")
def synapse_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRunner[DemoStack]]:
    with running_stack(tmp_path_factory.mktemp("synapse"), SYNAPSE) as runner:
        yield runner


@contextmanager
def stopped(runner: StackRunner[DemoStack], worker_class: str) -> Iterator[None]:
    """The workers of a class stopped (their DNS records kept), then back and ready."""
    runner.call(runner.stack.stop_class(worker_class))
    try:
        yield
    finally:
        runner.call(runner.stack.start_class(worker_class))
        runner.call(runner.stack.wait_ready(20))


def sent(runner: StackRunner[DemoStack], request: TrafficRequest) -> tuple[Outcome, dict[str, str]]:
    """Send one request; return its outcome and HAProxy's log line for it."""
    before = len(runner.log())
    outcome = runner.send(request)
    deadline = time.monotonic() + 5
    # Only request lines: HAProxy also logs server state changes (agent DOWN).
    while (
        not (lines := [x for x in runner.log_lines(before) if " via=" in x])
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert lines, "HAProxy logged nothing for the request"
    return outcome, log_fields(lines[-1])


def test_every_class_of_synapse_workers_reaches_its_backend(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    assert set(SYNAPSE_SAMPLES) == set(synapse_stack.stack.classes)
    for worker_class, request in SYNAPSE_SAMPLES.items():
        outcome, fields = sent(synapse_stack, request)
        assert outcome.status == 200, (worker_class, outcome)
        assert outcome.worker_class == worker_class, (request.target, outcome)
        assert fields["via"] == "agent"
        assert fields["class"] == worker_class
        assert fields["backend_server"].startswith(f"be_{worker_class}/")
        # The log names the worker that answered by its address.
        assert outcome.address and fields["srv"] == outcome.address, (fields, outcome)


def test_native_sliding_sync_reaches_the_sync_workers_by_agent_and_by_fallback(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    outcome, fields = sent(synapse_stack, SLIDING_SYNC)
    assert (outcome.worker_class, fields["rule"], fields["via"]) == (
        "synchrotron",
        "sliding_sync",
        "agent",
    )
    v2, _ = sent(synapse_stack, SYNAPSE_SAMPLES["synchrotron"])
    assert outcome.worker == v2.worker, "one user, one sync worker, whichever sync"


def test_with_mas_login_logout_and_refresh_reach_mas_and_never_main(tmp_path: Path) -> None:
    targets = ("/login", "/logout", "/logout/all", "/refresh", "/login/sso/redirect")
    requests = [req("POST", f"/_matrix/client/v3{t}") for t in targets]
    with running_stack(tmp_path, MAS) as runner:
        for request in requests:
            outcome, fields = sent(runner, request)
            assert (outcome.status, outcome.worker_class) == (200, "mas"), request
            assert fields["backend_server"].startswith("be_mas/")
        other, _ = sent(runner, SYNAPSE_SAMPLES["client_reader"])
        assert other.worker_class == "client_reader"
        # MAS down: no fallback to Synapse's main process, which would 404.
        runner.call(runner.stack.stop_class("mas"))
        deadline = time.monotonic() + 15
        while (outcome := runner.send(requests[0])).status == 200:
            assert outcome.worker_class == "mas", outcome
            assert time.monotonic() < deadline, "be_mas never noticed MAS was down"
            time.sleep(0.1)
        assert outcome.status == 429


def test_every_class_of_simple_reaches_its_backend(tmp_path: Path) -> None:
    with running_stack(tmp_path, SIMPLE) as runner:
        for worker_class, request in SIMPLE_SAMPLES.items():
            outcome, fields = sent(runner, request)
            assert (outcome.status, outcome.worker_class) == (200, worker_class), request
            assert fields["via"] == "agent"
        # The fallback, by the same policy, keeps the same classes and rules.
        runner.kill_agent()
        runner.wait_agent("DOWN")
        for worker_class, request in SIMPLE_SAMPLES.items():
            outcome, fields = sent(runner, request)
            assert (outcome.status, outcome.worker_class) == (200, worker_class), request
            assert fields["via"] == "fallback"


class EmptyMapStack(DemoStack):
    """HAProxy's fallback reads an empty map nobody keeps: the agent's file is another."""

    def haproxy_env(self) -> dict[str, str]:
        env = super().haproxy_env()
        empty = self.workdir / "empty.map"
        empty.touch()
        env["SPOA_FALLBACK_MAP"] = str(empty)
        return env


def test_with_an_empty_fallback_map_the_main_process_answers_once_the_agent_is_down(
    tmp_path: Path,
) -> None:
    with running_stack(tmp_path, SIMPLE, factory=EmptyMapStack) as runner:
        request = SIMPLE_SAMPLES["sync"]
        outcome, fields = sent(runner, request)
        assert (outcome.worker_class, fields["via"]) == ("sync", "agent")
        runner.kill_agent()
        runner.wait_agent("DOWN")
        outcome, fields = sent(runner, request)
        assert (outcome.status, outcome.worker) == (200, "main-1"), outcome
        assert fields["backend_server"] == "be_main/main", fields
        assert (fields["via"], fields["class"], fields["rule"]) == (
            "fallback",
            "-",
            "fallback_no_map",
        )


def agent_status(runner: StackRunner[DemoStack]) -> dict[str, Any]:
    address = runner.stack.agent_http
    with urllib.request.urlopen(f"http://{address}/status.json", timeout=5) as response:
        status: dict[str, Any] = json.loads(response.read())
    return status


def test_a_policy_edit_reaches_the_running_fallback_with_no_reload(tmp_path: Path) -> None:
    """A rule moved, a federation read added: applied by the agent, pushed into HAProxy's
    map through its runtime API; with the agent then killed, the fallback routes by it."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(SYNAPSE.read_text())
    with running_stack(tmp_path / "stack", policy) as runner:
        haproxy = runner.stack.haproxy
        assert haproxy is not None
        moved = req("GET", MOVED[0] + "?since=s1")
        added = req("GET", ADDED[0], XMATRIX)
        assert sent(runner, moved)[1]["rule"] == "sync"
        edited = edited_synapse_policy(tmp_path)
        edited.replace(policy)
        version = load_policy(str(policy)).version
        wait_until(lambda: sent(runner, moved)[1]["rule"] == MOVED[2], 15, "the edit applied")
        wait_until(
            lambda: (
                (agent_status(runner)["fallback_map"] or {}).get("in_sync") is True
                and agent_status(runner)["policy"]["version"] == version
            ),
            15,
            "the edited policy's map in HAProxy",
        )
        runner.kill_agent()
        runner.wait_agent("DOWN")
        for request, (_, worker_class, rule) in ((moved, MOVED), (added, ADDED)):
            outcome, fields = sent(runner, request)
            assert (outcome.worker_class, fields["rule"]) == (worker_class, rule)
            assert (fields["via"], fields["policy"]) == ("fallback", version)
        # The same HAProxy all along: nothing was reloaded.
        assert haproxy.poll() is None and runner.stack.haproxy is haproxy
        assert "reload" not in runner.log().lower()


class AgentlessStack(DemoStack):
    """The router with no agent at all: HAProxy alone, with the map made before it started."""

    def start_agent(self) -> None:
        pass


def test_an_haproxy_without_its_agent_routes_by_the_map_made_before_it_started(
    tmp_path: Path,
) -> None:
    policy = load_policy(str(SYNAPSE))
    with running_stack(tmp_path, SYNAPSE, factory=AgentlessStack, expect_agent=False) as runner:
        for worker_class, request in SYNAPSE_SAMPLES.items():
            outcome, fields = sent(runner, request)
            assert (outcome.status, outcome.worker_class) == (200, worker_class), request
            assert (fields["via"], fields["policy"]) == ("fallback", policy.version)
            decision = policy.decide(
                Request(request.method, request.path, request.query, request.auth)
            )
            assert fields["key"] == (str(decision.key) if decision.key is not None else "-")


def test_replication_paths_are_refused_from_outside(synapse_stack: StackRunner[DemoStack]) -> None:
    outcome = synapse_stack.send(req("POST", "/_synapse/replication/send_event/x"))
    assert outcome.status == 404


def test_all_workers_of_a_class_down_then_main_answers(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    request = SYNAPSE_SAMPLES["event_creator"]
    assert synapse_stack.send(request).worker_class == "event_creator"
    with stopped(synapse_stack, "event_creator"):
        deadline = time.monotonic() + 15
        while True:
            outcome = synapse_stack.send(request)
            if outcome.worker_class == "main":
                break
            assert time.monotonic() < deadline, "main never took over"
            time.sleep(0.1)
        assert outcome.status == 200
        assert outcome.worker == "main-1"
    assert synapse_stack.send(request).worker_class == "event_creator"


def test_agent_killed_mid_traffic_then_fallback_keeps_classes_and_servers_then_agent_returns(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    runner = synapse_stack
    traffic = list(generate(400, Deployment(users=60, rooms=20, remotes=10, seed=7)))

    # With the agent: where each request lands (one at a time, so bounded-load
    # hashing never spills and a key's server is the hash's choice).
    with_agent = []
    for request in traffic:
        outcome, fields = sent(runner, request)
        assert outcome.status == 200 and fields["via"] == "agent"
        with_agent.append((outcome, fields["rule"], fields["key"]))

    # Kill the agent while requests flow: every one of them is answered.
    failures: list[Outcome] = []
    answered = 0
    stop = threading.Event()

    def keep_sending() -> None:
        nonlocal answered
        i = 0
        while not stop.is_set():
            outcome = runner.send(traffic[i % len(traffic)])
            answered += 1
            if outcome.status != 200:
                failures.append(outcome)
            i += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    time.sleep(0.5)
    runner.kill_agent()
    runner.wait_agent("DOWN")
    time.sleep(0.5)
    stop.set()
    sender.join()
    assert answered > 50
    assert failures == []

    # Without the agent: the fallback decides, by the table the agent wrote,
    # with the agent's rule, class and key for every request, so the same
    # server wherever there is a key (keyless rules are balanced as HAProxy
    # sees fit, with the agent too).
    keyed = 0
    for request, (before, rule, key) in zip(traffic, with_agent, strict=True):
        outcome, fields = sent(runner, request)
        assert outcome.status == 200
        assert fields["via"] == "fallback"
        assert (fields["rule"], outcome.worker_class, fields["key"]) == (
            rule,
            before.worker_class,
            key,
        ), (request.kind, request.target, fields)
        if key not in ("", "-"):
            keyed += 1
            assert outcome.worker == before.worker, (request.kind, request.target, fields)
    assert keyed > len(traffic) // 2

    # The agent comes back: decisions are the agent's again.
    runner.stack.start_agent()
    runner.wait_agent("UP")
    outcome, fields = sent(runner, SYNAPSE_SAMPLES["client_reader"])
    assert fields["via"] == "agent"
    assert outcome.worker_class == "client_reader"


def raw(
    runner: StackRunner[DemoStack], method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request to HAProxy: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection("127.0.0.1", runner.stack.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_a_cors_preflight_is_answered_by_haproxy_without_asking_the_agent(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    def decisions() -> int:
        url = f"http://{synapse_stack.stack.agent_http}/status.json"
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(json.loads(response.read())["decisions_total"])

    decided = decisions()
    before = len(synapse_stack.log())
    status, headers, body = raw(
        synapse_stack,
        "OPTIONS",
        "/_matrix/client/v3/sync",
        {"Origin": "https://app.element.io", "Access-Control-Request-Method": "GET"},
    )
    assert (status, body) == (204, b"")
    assert headers["access-control-allow-origin"] == "*"
    assert "PUT" in headers["access-control-allow-methods"]
    assert "Authorization" in headers["access-control-allow-headers"]
    deadline = time.monotonic() + 5
    while not (lines := synapse_stack.log_lines(before)) and time.monotonic() < deadline:
        time.sleep(0.01)
    fields = log_fields(lines[-1])
    # No agent answer, no agent error, no time spent on the agent: the message
    # was never sent, and the agent decided nothing.
    assert (fields["method"], fields["via"], fields["spoe_err"], fields["spoe_ms"]) == (
        "OPTIONS",
        "-",
        "-",
        "-",
    ), fields
    assert decisions() == decided


def test_haproxy_s_own_errors_are_matrix_json_with_cors(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    status, headers, body = raw(synapse_stack, "POST", "/_synapse/replication/send_event/x")
    assert status == 404
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    assert json.loads(body)["errcode"] == "M_UNRECOGNIZED"


def test_a_stream_writer_down_fails_clearly_with_429_and_never_reaches_main(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    request = SYNAPSE_SAMPLES["typing"]
    assert synapse_stack.send(request).worker_class == "typing"
    with stopped(synapse_stack, "typing"):
        deadline = time.monotonic() + 15
        while (outcome := synapse_stack.send(request)).status == 200:
            assert outcome.worker_class == "typing", outcome  # never main
            assert time.monotonic() < deadline, "be_typing never noticed its writer was down"
            time.sleep(0.1)
        status, headers, body = raw(synapse_stack, request.method, request.target, request.headers)
        assert status == 429
        assert headers["retry-after"] == "5"
        assert headers["access-control-allow-origin"] == "*"
        error = json.loads(body)
        assert error["errcode"] == "M_LIMIT_EXCEEDED" and error["retry_after_ms"] == 5000
    assert synapse_stack.send(request).worker_class == "typing"


def test_workers_learn_the_scheme_from_the_proxy_in_front_or_from_haproxy(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    path = "/_matrix/client/v3/profile/@alice:x"
    _, _, body = raw(synapse_stack, "GET", path)
    assert json.loads(body)["forwarded_proto"] == "http"
    _, _, body = raw(synapse_stack, "GET", path, {"X-Forwarded-Proto": "https"})
    assert json.loads(body)["forwarded_proto"] == "https"


def test_haproxy_answers_its_own_probes_and_is_unready_without_main(
    synapse_stack: StackRunner[DemoStack],
) -> None:
    stack = synapse_stack.stack

    def probe(path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", stack.stats_port, timeout=5)
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    assert (probe("/healthz"), probe("/ready")) == (200, 200)
    main = stack.main
    assert main is not None
    synapse_stack.call(main.stop())
    try:
        deadline = time.monotonic() + 15
        while probe("/ready") == 200:
            assert time.monotonic() < deadline, "/ready stayed ready without main"
            time.sleep(0.1)
        assert probe("/ready") == 503 and probe("/healthz") == 200
    finally:
        again = DemoWorker(WorkerSpec("main-1", "main", "127.0.0.1", main.port))
        stack.main = synapse_stack.call(again.start())  # on the same port
        synapse_stack.call(stack.wait_ready(20))
    assert probe("/ready") == 200
