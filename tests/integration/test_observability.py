"""What operators see: /metrics after real traffic, reloads, the status page in a browser.

Real HAProxy (the shipped configuration), the real agent and demo workers;
the status page is opened in Debian's headless Chromium while traffic runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spoa.demo.stack import DemoStack
from spoa.policy import load_policy
from spoa.traffic import Deployment, TrafficRequest, generate
from tests.integration.stack_runner import StackRunner, running_stack
from tests.test_deploy import dashboard_metric_names

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Set to a path (docs/status-page.png) to keep the browser's screenshot.
SCREENSHOT = os.environ.get("SPOA_STATUS_SCREENSHOT")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackRunner[DemoStack]]:
    workdir = tmp_path_factory.mktemp("observability")
    policy = workdir / "policy.yaml"
    shutil.copy(ROOT / "policies" / "synapse-workers.yaml", policy)
    with running_stack(workdir, policy) as runner:
        yield runner


def agent_url(runner: StackRunner[DemoStack], path: str) -> str:
    return f"http://{runner.stack.agent_http}{path}"


def decisions(runner: StackRunner[DemoStack]) -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(get(agent_url(runner, "/metrics"))):
        for sample in family.samples:
            if sample.name == "spoa_decisions_total":
                counts[(sample.labels["class"], sample.labels["rule"])] += int(sample.value)
    return counts


def metric(runner: StackRunner[DemoStack], name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(get(agent_url(runner, "/metrics"))):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(name)


def traffic(n: int, seed: int) -> list[TrafficRequest]:
    return list(generate(n, Deployment(users=30, rooms=10, remotes=5, seed=seed)))


def test_metrics_count_exactly_the_requests_sent_by_class_and_rule(
    stack: StackRunner[DemoStack],
) -> None:
    requests = traffic(300, seed=3)
    policy = load_policy(str(stack.stack.policy))
    from ipaddress import ip_address

    from spoa.policy import Request

    expected: Counter[tuple[str, str]] = Counter()
    for r in requests:
        d = policy.decide(Request(r.method, r.path, r.query, r.auth, ip_address("127.0.0.1")))
        expected[(d.worker_class, d.rule)] += 1
    before = decisions(stack)
    for request in requests:
        assert stack.send(request).status == 200
    after = decisions(stack)
    assert after - before == expected
    assert len(expected) >= 8
    healthz = get(agent_url(stack, "/healthz"))
    assert healthz.startswith("ok")


def test_a_reload_counts_as_success_and_a_broken_edit_as_failure(
    stack: StackRunner[DemoStack],
) -> None:
    path = stack.stack.policy
    good = path.read_text()
    try:
        ok0 = metric(stack, "spoa_policy_reloads_total", result="success")
        failed0 = metric(stack, "spoa_policy_reloads_total", result="failure")
        path.write_text(good.replace("name: synapse-workers", "name: synapse-workers-edited"))
        deadline = time.monotonic() + 10
        while metric(stack, "spoa_policy_reloads_total", result="success") == ok0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        version = load_policy(str(path)).version
        assert metric(stack, "spoa_policy_info", version=version) == 1
        assert metric(stack, "spoa_policy_last_reload_successful") == 1
        # Written in place (truncated, then written): never tried half-written.
        assert metric(stack, "spoa_policy_reloads_total", result="failure") == failed0

        path.write_text(good.replace("class: synchrotron", "class: nowhere"))
        while metric(stack, "spoa_policy_reloads_total", result="failure") == failed0:
            assert time.monotonic() < deadline + 10
            time.sleep(0.1)
        assert metric(stack, "spoa_policy_info", version=version) == 1  # unchanged
        assert metric(stack, "spoa_policy_last_reload_successful") == 0
        status = get(agent_url(stack, "/"))
        assert "The last edit was rejected" in status and "unknown class" in status
    finally:
        path.write_text(good)  # the next tests start from the shipped policy


def test_no_token_room_or_path_in_metrics_or_logs(stack: StackRunner[DemoStack]) -> None:
    token = "syt_c2VjcmV0dXNlcg_SECRETSECRETSECRETSE_zz9zz9"
    room = "!topsecretroom:example.org"
    for target, headers in (
        ("/_matrix/client/v3/sync?since=s1", {"Authorization": f"Bearer {token}"}),
        (f"/_matrix/client/v3/sync?since=s1&access_token={token}", {}),
        (f"/_matrix/client/v3/rooms/{room}/send/m.room.message/x1", {}),
        (f"/_matrix/client/v3/rooms/{room}/messages?access_token={token}", {}),
    ):
        path, _, query = target.partition("?")
        stack.send(
            TrafficRequest(
                "x", "GET" if "send" not in path else "PUT", path, query or None, headers
            )
        )
    texts = {
        "metrics": get(agent_url(stack, "/metrics")),
        "status page": get(agent_url(stack, "/")),
        "status.json": get(agent_url(stack, "/status.json")),
        "agent log": (stack.stack.workdir / "agent.log").read_text(),
    }
    for where, text in texts.items():
        for secret in (
            token,
            "SECRETSECRET",
            "c2VjcmV0dXNlcg",
            "secretuser",
            "topsecretroom",
            "/_matrix/client/v3/rooms",
        ):
            assert secret not in text, f"{secret!r} in the {where}"
    # HAProxy's own log records paths (operators want them) but never a query.
    haproxy_log = stack.log()
    assert "topsecretroom" in haproxy_log
    assert token not in haproxy_log and "SECRETSECRET" not in haproxy_log


def test_the_dashboard_queries_only_metrics_that_exist(stack: StackRunner[DemoStack]) -> None:
    stack.send(TrafficRequest("x", "GET", "/_matrix/client/versions"))
    exported = set()
    for text in (
        get(agent_url(stack, "/metrics")),
        get(f"http://127.0.0.1:{stack.stack.stats_port}/metrics"),
    ):
        for family in text_string_to_metric_families(text):
            exported |= {sample.name for sample in family.samples}
    missing = dashboard_metric_names() - exported
    assert not missing, f"the dashboard queries metrics nobody exports: {sorted(missing)}"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("chromium is not installed (the README's test command installs it)")
    return found


def browser(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp / 'chromium'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_status_page_in_a_real_browser_while_traffic_runs(
    stack: StackRunner[DemoStack], tmp_path: Path
) -> None:
    stop = threading.Event()
    requests = traffic(2000, seed=9)

    def keep_sending() -> None:
        i = 0
        while not stop.is_set():
            stack.send(requests[i % len(requests)])
            i += 1

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        time.sleep(3)
        url = agent_url(stack, "/")
        # Let the page's script run a refresh from /status.json, then read the DOM.
        dom = browser(tmp_path, "--virtual-time-budget=4000", "--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "status.png"
        picture = browser(tmp_path, "--window-size=1100,1000", f"--screenshot={shot}", url)
        assert picture.returncode == 0, picture.stderr[-2000:]
    finally:
        stop.set()
        sender.join()
    html = dom.stdout
    version = load_policy(str(stack.stack.policy)).version
    assert f'<b id="version">{version}</b>' in html
    rate = re.search(r'id="rate">([\d.]+)<', html)
    assert rate and float(rate.group(1)) > 0
    classes = dict(re.findall(r'<tr><td>(\w+)</td><td class="num">([\d.]+)</td>', html))
    assert float(classes.get("synchrotron", 0)) > 0
    assert float(classes.get("event_creator", 0)) > 0
    updated = re.search(r'id="updated">([^<]+)<', html)
    assert updated and updated.group(1) != "now", "the page's script did not refresh it"
    assert shot.stat().st_size > 10_000
