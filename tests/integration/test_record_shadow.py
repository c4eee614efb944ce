"""spoa serve --record and --shadow behind the shipped haproxy.cfg, with real HTTP.

A flood of requests, each with a secret of its own, goes through HAProxy and
the agent: the recording holds none of them and replays (spoa explain
--jsonl) to the classes recorded. A shadow candidate that moves the profile
routes counts exactly the profile requests sent, while HAProxy keeps routing
by the running policy; a broken candidate is reported and routing goes on.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from spoa.policy import Request, load_policy
from spoa.traffic import TrafficRequest, generate
from tests.integration.harness import wait_until
from tests.integration.stack_runner import running_stack
from tests.replay import assert_replays_as_recorded

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SYNAPSE = ROOT / "policies" / "synapse-workers.yaml"
MOVED = (
    "version: 1\nname: candidate\nextends: synapse-workers\n"
    "rules:\n  patch:\n    - {name: profile, class: main}\n"
)


def status(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{http}/status.json", timeout=5) as response:
        found: dict[str, Any] = json.load(response)
        return found


def flood(count: int) -> tuple[list[TrafficRequest], set[str]]:
    """spoa.traffic's requests, each federation one signed, a third with an opaque token."""
    sent, secrets = [], set()
    for i, request in enumerate(generate(count)):
        headers = dict(request.headers)
        if request.path.startswith("/_matrix/federation"):
            secret = f"flood-signature-{i:05d}"
            headers["Authorization"] = f'X-Matrix origin="s{i % 5}.example",key="k",sig="{secret}"'
        elif i % 3 == 0:
            secret = f"mat_flood{i:05d}opaque"
            headers["Authorization"] = f"Bearer {secret}"
        else:
            auth = headers.get("Authorization", "")
            secret = auth.split("_", 2)[-1] if auth else ""
        if "access_token=" in (request.query or ""):
            secrets.add((request.query or "").split("access_token=")[1].split("&")[0])
        if secret:
            secrets.add(secret)
        sent.append(
            TrafficRequest(
                request.kind, request.method, request.path, request.query, headers, request.src
            )
        )
    return sent, secrets


def test_a_recorded_flood_holds_no_secret_and_replays_to_its_classes(tmp_path: Path) -> None:
    record = tmp_path / "recorded.jsonl"
    args = ("--record", str(record), "--record-rate", "100000")
    sent, secrets = flood(1500)
    with running_stack(tmp_path / "stack", SYNAPSE, agent_args=args) as runner:
        for request in sent:
            assert runner.send(request).status == 200, request
        agent_http = runner.stack.agent_http
        wait_until(lambda: status(agent_http)["record"]["written"] >= len(sent), 10, "recording")
        runner.stack.stop_agent()
    text = record.read_text()
    assert len(text.splitlines()) == len(sent)
    assert len(secrets) > 1000
    assert_replays_as_recorded(text, SYNAPSE, secrets)


def test_a_shadow_candidate_counts_what_it_would_move_and_never_routes(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(MOVED)
    sent = list(generate(1500))
    base = load_policy(str(SYNAPSE))
    profile = sum(
        1
        for t in sent
        if base.decide(Request(t.method, t.path, t.query, t.auth, t.src)).rule == "profile"
    )
    assert profile > 5
    args = ("--shadow", str(candidate), "--settle", "0")
    with running_stack(tmp_path / "stack", SYNAPSE, agent_args=args) as runner:
        classes = [runner.send(t).worker_class for t in sent]
        agent_http = runner.stack.agent_http
        wait_until(lambda: status(agent_http)["shadow"]["decided"] >= len(sent), 10, "shadow")
        shadow = status(agent_http)["shadow"]
        moved = {(c["class"], c["shadow_class"]): c["requests"] for c in shadow["classes"]}
        assert moved[("event_creator", "main")] == profile == shadow["differing"]
        # HAProxy routed the profile requests by the running policy.
        assert classes.count("event_creator") >= profile
        with urllib.request.urlopen(f"http://{agent_http}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert (
            f'spoa_shadow_decisions_total{{class="event_creator",shadow_class="main"}} {profile}.0'
        ) in metrics
        with urllib.request.urlopen(f"http://{agent_http}/", timeout=5) as response:
            assert "Shadow policy" in response.read().decode()
        # A broken edit of the candidate: reported, the last good one kept, routing unchanged.
        candidate.write_text("version: 1\nname: candidate\nrules: [\n")
        wait_until(lambda: status(agent_http)["shadow"]["error"] is not None, 10, "the error")
        assert status(agent_http)["shadow"]["version"] == shadow["version"]
        started = time.monotonic()
        for t in sent[:100]:
            assert runner.send(t).status == 200
        assert time.monotonic() - started < 30
        assert "candidate.yaml:4: $: invalid YAML" in status(agent_http)["shadow"]["error"]
