"""Metrics and the status endpoint, in process: names, labels, counts, nothing secret."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoa.httpd import HttpRequest
from spoa.metrics import AgentCollector, build_registry
from spoa.policy.reload import PolicyHolder
from spoa.routing import RouteHandler
from spoa.server import SpopServer
from spoa.spop import Message, Notify
from spoa.stats import LATENCY_SAMPLE, DecisionStats
from spoa.status import DecisionRates, StatusApp, render_page

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "syt_YWxpY2U_topsecrettopsecret_1a2b3c"
ROOM = "!secretroom:example.org"


@pytest.fixture
def parts(tmp_path: Path) -> tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp]:
    policy = tmp_path / "policy.yaml"
    policy.write_bytes((ROOT / "policies" / "synapse-workers.yaml").read_bytes())
    holder = PolicyHolder(str(policy), settle=0)  # the tests edit it in place
    stats = DecisionStats()
    handler = RouteHandler(holder, stats)
    server = SpopServer(handler)
    registry = build_registry(AgentCollector(server.stats, stats, holder))
    return holder, handler, server, StatusApp(server, stats, holder, registry)


def route(handler: RouteHandler, method: str, path: str, **args: str) -> None:
    handler(Notify(1, 1, [Message("route", {"method": method, "path": path, **args})]))


def scrape(app: StatusApp) -> str:
    response = app(HttpRequest("GET", "/metrics", "HTTP/1.1", {}))
    assert response.status == 200
    return response.body.decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_decisions_are_counted_by_class_rule_and_key_kind(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    _, handler, _, app = parts
    for _ in range(3):
        route(handler, "GET", "/_matrix/client/v3/sync", query="since=1", auth=f"Bearer {TOKEN}")
    route(handler, "GET", "/_matrix/client/v3/sync", query="since=1", auth="Bearer mat_other")
    route(handler, "PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/m.room.message/1")
    route(handler, "POST", "/_matrix/client/v3/logout")
    found = samples(scrape(app))

    def decisions(worker_class: str, rule: str, kind: str) -> float:
        labels = (("class", worker_class), ("key_kind", kind), ("rule", rule))
        return found[("spoa_decisions_total", labels)]

    assert decisions("synchrotron", "sync", "user") == 3
    assert decisions("synchrotron", "sync", "token") == 1
    assert decisions("event_creator", "event_sending", "room") == 1
    assert decisions("main", "default", "none") == 1
    assert found[("spoa_default_decisions_total", ())] == 1
    count = found[("spoa_decision_duration_seconds_count", ())]
    assert count == 6 // LATENCY_SAMPLE
    assert found[("spoa_decision_duration_seconds_bucket", (("le", "+Inf"),))] == count


def test_no_token_room_or_path_appears_in_metrics(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    _, handler, _, app = parts
    route(handler, "GET", "/_matrix/client/v3/sync", auth=f"Bearer {TOKEN}")
    route(handler, "GET", "/_matrix/client/v3/sync", query=f"access_token={TOKEN}")
    route(handler, "PUT", f"/_matrix/client/v3/rooms/{ROOM}/send/x/1")
    route(handler, "GET", "/_matrix/client/v3/profile/@alice:example.org")
    text = scrape(app)
    for secret in (TOKEN, "topsecret", "secretroom", "/_matrix", "alice", "YWxpY2U"):
        assert secret not in text
    status = app(HttpRequest("GET", "/status.json", "HTTP/1.1", {})).body.decode()
    page = app(HttpRequest("GET", "/", "HTTP/1.1", {})).body.decode()
    for secret in (TOKEN, "secretroom", "/_matrix/client"):
        assert secret not in status and secret not in page


def test_every_metric_is_named_for_prometheus(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    _, handler, _, app = parts
    route(handler, "GET", "/_matrix/client/versions")
    names = {f.name for f in text_string_to_metric_families(scrape(app))}
    spoa = {n for n in names if n.startswith("spoa_")}
    assert spoa >= {
        "spoa_decisions",
        "spoa_default_decisions",
        "spoa_decision_duration_seconds",
        "spoa_connections_open",
        "spoa_connections_accepted",
        "spoa_frames_received",
        "spoa_frames_sent",
        "spoa_protocol_errors",
        "spoa_handler_errors",
        "spoa_policy_reloads",
        "spoa_policy_info",
        "spoa_policy_last_reload_success_timestamp_seconds",
        "spoa_policy_last_reload_successful",
        "spoa_build_info",
    }
    assert all(re.fullmatch(r"spoa_[a-z0-9_]+", n) for n in spoa)
    assert "process_cpu_seconds" in names


def test_reloads_are_counted_and_the_version_follows(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    holder, _, _, app = parts
    path = Path(holder.path)
    first = holder.current.version
    path.write_text(path.read_text().replace("name: synapse-workers", "name: edited"))
    holder.reload()
    second = holder.current.version
    path.write_text("version: 1\nbroken: [\n")
    holder.reload()
    found = samples(scrape(app))
    assert found[("spoa_policy_reloads_total", (("result", "success"),))] == 1
    assert found[("spoa_policy_reloads_total", (("result", "failure"),))] == 1
    assert found[("spoa_policy_last_reload_successful", ())] == 0
    assert found[("spoa_policy_info", (("name", "edited"), ("version", second)))] == 1
    assert second != first
    snapshot = json.loads(app(HttpRequest("GET", "/status.json", "HTTP/1.1", {})).body)
    assert snapshot["policy"]["version"] == second
    assert "invalid YAML" in snapshot["policy"]["last_error"]


def test_healthz_is_ready_only_with_a_policy_and_a_listener(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, _, server, app = parts
    response = app(HttpRequest("GET", "/healthz", "HTTP/1.1", {}))
    assert response.status == 503 and b"SPOP listener" in response.body
    monkeypatch.setattr(SpopServer, "listening", property(lambda self: True))
    assert app(HttpRequest("GET", "/healthz", "HTTP/1.1", {})).status == 200
    no_policy = StatusApp(server, DecisionStats(), None, app.registry)
    assert no_policy(HttpRequest("GET", "/healthz", "HTTP/1.1", {})).status == 503


def test_unknown_paths_and_methods_are_refused(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    _, _, _, app = parts
    assert app(HttpRequest("GET", "/nope", "HTTP/1.1", {})).status == 404
    assert app(HttpRequest("POST", "/metrics", "HTTP/1.1", {})).status == 405


def test_rates_are_over_the_last_minute() -> None:
    stats = DecisionStats()
    rates = DecisionRates(stats)
    stats.counts[("a", "r1", "none")] = 120
    rates.sample(now=10_000.0)  # replaces nothing: the first sample is from start
    span, by_class, by_rule = rates.rates(now=10_000.0 + 1)
    assert by_class["a"] == pytest.approx(120 / span)
    rates2 = DecisionRates(stats)
    rates2._samples[0] = type(rates2._samples[0])(0.0, {("a", "r1", "none"): 60})
    _, by_class, by_rule = rates2.rates(now=30.0)
    assert by_class == {"a": 2.0} and by_rule == {"r1": 2.0}


def test_status_page_shows_version_classes_and_a_rejected_edit(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    holder, handler, _, app = parts
    route(handler, "GET", "/_matrix/client/v3/sync", query="since=1", auth=f"Bearer {TOKEN}")
    path = Path(holder.path)
    path.write_text("version: 1\n")
    holder.reload()
    page = render_page(app.snapshot())
    assert holder.current.version in page
    assert "synchrotron" in page and "<table>" in page
    assert "The last edit was rejected" in page
    assert "missing required key" in page
    assert "http://" not in page and "https://" not in page  # no external assets


def test_shares_at_low_traffic_agree_with_each_other_and_the_headline(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    _, handler, _, app = parts
    for _ in range(10):
        route(handler, "GET", "/_matrix/client/v3/sync", query="since=1", auth=f"Bearer {TOKEN}")
    route(handler, "GET", "/nothing/routes/this")  # the policy's default: main
    # Eleven decisions in a minute: rates of 0.17/s and 0.02/s once rounded.
    first = app.rates._samples[0]
    app.rates._samples[0] = type(first)(first.at - 60, first.counts)
    snap = app.snapshot()
    assert sum(snap["class_shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert snap["class_shares"]["main"] == snap["default_share"] == pytest.approx(1 / 11, abs=1e-4)
    page = render_page(snap)
    assert re.search(r"<span id=default>9\.1%</span>", page)
    assert re.search(r"<td>main</td><td class=num>0\.02</td><td class=num>9\.1%</td>", page)
    assert re.search(r"<td>synchrotron</td><td class=num>0\.17</td><td class=num>90\.9%</td>", page)


def test_a_long_rejected_edit_wraps_inside_its_box(
    parts: tuple[PolicyHolder, RouteHandler, SpopServer, StatusApp],
) -> None:
    holder, _, _, app = parts
    Path(holder.path).write_text("rules:\n  - name: " + "x" * 400 + "\n    match: [\n")
    holder.reload()
    page = render_page(app.snapshot())
    assert "The last edit was rejected" in page
    assert re.search(r"\.error pre \{[^}]*white-space: pre-wrap[^}]*overflow-wrap: anywhere", page)
