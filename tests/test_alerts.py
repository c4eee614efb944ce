"""The shipped alerting rules: promtool checks them and runs their tests; one copy of them.

deploy/prometheus/alerts_test.yml has series that make each alert fire and
series that must not; a rule changed (a threshold, a duration) fails it. The
Kubernetes PrometheusRule holds the same groups, every alert has its runbook
in docs/alerts.md, and every metric a rule reads is one the agent exports or
a running HAProxy's exporter serves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
RUNBOOK = ROOT / "docs" / "alerts.md"


def promtool() -> str:
    found = os.environ.get("SPOA_PROMTOOL") or shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is needed (the README's test command unpacks it)")
        pytest.skip("no promtool here (./dev.sh test unpacks it)")
    return found


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_checks_the_rules_and_their_tests_pass() -> None:
    checked = run("check", "rules", str(RULES), cwd=ROOT)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout
    tested = run("test", "rules", RULES_TEST.name, cwd=RULES.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_is_tested_firing() -> None:
    tested = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tested
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert fired == {rule["alert"] for rule in alerts()}


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (
            'expr: up{job="spoa"} == 0\n        for: 1m',
            'expr: up{job="spoa"} == 0\n        for: 5m',
        ),
        (
            '/ sum by (instance) (rate(spoa_whoami_lookups_total{job="spoa"}[5m])) > 0.1',
            '/ sum by (instance) (rate(spoa_whoami_lookups_total{job="spoa"}[5m])) > 0.3',
        ),
        (
            'count(count by (version) (spoa_policy_info{job="spoa"})) > 1',
            'count(count by (version) (spoa_policy_info{job="spoa"})) > 0',
        ),
    ],
)
def test_the_tests_fail_when_a_rule_changes(old: str, new: str, tmp_path: Path) -> None:
    text = RULES.read_text()
    assert old in text
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    tested = run("test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert tested.returncode != 0
    assert "FAILED" in tested.stdout + tested.stderr


def test_the_kubernetes_prometheus_rule_has_the_same_groups() -> None:
    rule = yaml.safe_load((ROOT / "deploy/kubernetes/monitoring/prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    monitor = yaml.safe_load((ROOT / "deploy/kubernetes/monitoring/podmonitor.yaml").read_text())
    jobs = {
        endpoint["port"]: endpoint["relabelings"][0]["replacement"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]
    }
    # The job labels the rules select on.
    assert jobs == {"stats": "haproxy", "agent-http": "spoa"}


def test_every_alert_has_a_runbook_section() -> None:
    text = RUNBOOK.read_text()
    headings = {re.sub(r"[^a-z0-9]", "", h.lower()) for h in re.findall(r"^## (.+)$", text, re.M)}
    for rule in alerts():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert anchor in headings, rule["alert"]


def rule_metrics() -> set[str]:
    return {
        name
        for rule in alerts()
        for name in re.findall(r"\b((?:spoa|haproxy)_[a-z_]+)\b", rule["expr"])
    }


def test_the_rules_read_only_metrics_the_agent_exports() -> None:
    exported = set(re.findall(r'"(spoa_[a-z_]+)"', (ROOT / "spoa" / "metrics.py").read_text()))
    for name in rule_metrics():
        if name.startswith("spoa_"):
            assert re.sub(r"_(total|bucket|info)$", "", name) in exported, name


@pytest.mark.integration
def test_haproxy_exports_the_metrics_the_rules_read(tmp_path: Path) -> None:
    from tests.integration.stack_runner import running_stack

    with running_stack(tmp_path, ROOT / "policies" / "simple.yaml") as runner:
        url = f"http://127.0.0.1:{runner.stack.stats_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    for name in rule_metrics():
        if name.startswith("haproxy_"):
            assert re.search(rf"^{name}{{", text, re.M), name
    assert 'haproxy_backend_active_servers{proxy="be_spoa"}' in text
    assert 'haproxy_frontend_http_requests_total{proxy="fe_matrix"}' in text
